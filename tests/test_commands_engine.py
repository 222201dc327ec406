"""The `generate`, `bench` and `eval` commands (commands/engine.py) end to end on tiny random models: output, the
results files, the perplexity table, and bad inputs as one line with status 2.
"""

import json

import pytest

from fp6llm.cli import main
from helpers import TINY_VOCAB as VOCAB


def test_cli_generate_streams_one_prompt_and_prints_a_batch(capsys, tmp_path):
    assert main(["generate", "--random", "tiny-llama", "--prompt", "Hello", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and "tok/s" in out.splitlines()[-1]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\ntwo two\n")
    assert main(["generate", "--random", "tiny-opt", "--prompt-file", str(prompts), "--prompt", "three",
                 "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "20", "--seed", "1",
                 "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("---")] == ["--- 0", "--- 1", "--- 2"]


def test_cli_bench_writes_results(capsys, tmp_path):
    assert main(["bench", "--random", "tiny-llama", "--formats", "fp16,e3m2", "--batch", "1,3", "--prompt-len", "8",
                 "--gen-len", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fp16 (as fp32) | 3 |" in out and "| e3m2 | 1 |" in out
    (md,), (js,) = tmp_path.glob("e2e-cpu-*.md"), tmp_path.glob("e2e-cpu-*.json")
    result = json.loads(js.read_text())
    assert [(r["format"], r["batch"]) for r in result["rows"]] == [("fp16 (as fp32)", 1), ("fp16 (as fp32)", 3),
                                                                   ("e3m2", 1), ("e3m2", 3)]
    assert all(r["decode_tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["floor_fraction"] > 0
               for r in result["rows"])
    assert result["setup"]["copy_bandwidth_gb_s"] > 0 and result["setup"]["programmatic_launch"] is False
    assert "| e3m2 | 3 |" in md.read_text()


def test_cli_bench_times_an_lm_head_format_beside_the_float_head(capsys, tmp_path):
    """--formats e3m2,e3m2+head=e2m5: a row each; with lm_head untied (tiny-llama) the model holds fewer bytes."""
    assert main(["bench", "--random", "tiny-llama", "--formats", "e3m2,e3m2+head=e2m5", "--batch", "2",
                 "--prompt-len", "8", "--gen-len", "3", "--out", str(tmp_path)]) == 0
    assert "| e3m2+head=e2m5 | 2 |" in capsys.readouterr().out
    (js,) = tmp_path.glob("e2e-cpu-*.json")
    rows = {r["format"]: r for r in json.loads(js.read_text())["rows"]}
    assert rows["e3m2+head=e2m5"]["weight_gb"] < rows["e3m2"]["weight_gb"]


def test_cli_bench_programmatic_launch_is_scoped_and_recorded(capsys, tmp_path, monkeypatch):
    """Programmatic dependent launch is on by default (launch.PDL) and --no-programmatic-launch turns it off for the
    run only; the results say whether the run used it (never on a CPU, which has none)."""
    from fp6llm.kernels import launch
    seen = []
    real = launch.programmatic_launch

    def spy(on=True):
        seen.append(on)
        return real(on)
    monkeypatch.setattr(launch, "programmatic_launch", spy)
    monkeypatch.setattr(launch, "PDL", True)
    for flag in ([], ["--no-programmatic-launch"]):
        out = tmp_path / str(len(flag))
        assert main(["bench", "--random", "tiny-llama", "--formats", "e3m2", "--batch", "1", "--prompt-len", "8",
                     "--gen-len", "2", "--out", str(out), *flag]) == 0
        (js,) = out.glob("e2e-cpu-*.json")
        assert json.loads(js.read_text())["setup"]["programmatic_launch"] is False
        assert "programmatic dependent launch" not in next(out.glob("e2e-cpu-*.md")).read_text()
    assert seen == [True, False] and launch.PDL is True


def test_cli_eval_prints_perplexity_per_format(capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 4)
    assert main(["eval", "--random", "tiny-llama", "--formats", "e3m2,e2m1", "--text", str(text), "--ctx", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "reference fp32 (fp16 runs in float32 on a CPU)" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["fp16", "e3m2", "e2m1"]
    assert rows["fp16"][-1] == "1.0000"
    assert all(1 < float(row[-3]) < 2 * VOCAB for row in rows.values())  # perplexity of a random model


@pytest.mark.parametrize("argv, message", [
    (["generate", "--random", "nope", "--prompt", "x"], "unknown random model 'nope'; valid names"),
    (["generate", "--random", "tiny-llama", "--format", "e9m9", "--prompt", "x"], "unsupported format e9m9"),
    (["generate", "--random", "tiny-llama", "--format", "fp7", "--prompt", "x"], "unknown format 'fp7'"),
    (["generate", "--random", "tiny-llama", "--prompt", "x", "--max-new-tokens", "600"],
     "the prompt has 2 tokens + max_new_tokens 600 = 602, more than the model's max_position_embeddings 512"),
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "model directory /no/such/dir does not exist"),
    (["generate", "--random", "tiny-llama"], "no prompt"),
    (["generate", "--random", "tiny-llama", "--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["bench", "--random", "tiny-llama", "--formats", "e3m2", "--batch", "1,x"], "--batch must be"),
    (["bench", "--random", "tiny-llama", "--prompt-len", "500", "--gen-len", "20"], "beyond the model's"),
    (["eval", "--random", "tiny-llama", "--text", "/no/such/file"], "--text /no/such/file does not exist"),
], ids=["random-name", "format", "format-alias", "beyond-cache", "model-dir", "no-prompt", "top-p", "batch",
        "bench-length", "text-file"])
def test_cli_bad_inputs_give_one_line_and_status_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err
    assert captured.err.startswith(f"fp6llm {argv[0]}: error: ")


def test_cli_eval_text_too_short(capsys, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("too short")
    assert main(["eval", "--random", "tiny-llama", "--text", str(text), "--ctx", "64"]) == 2
    assert "not enough for one window of ctx=64" in capsys.readouterr().err
