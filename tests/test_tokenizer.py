"""Tokenizers (engine/tokenizer.py): TextStream's incremental decoding."""

from fp6llm.engine import ByteTokenizer, TextStream


def test_text_stream_holds_back_split_characters():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("naïve € 𝄞 café")
    stream = TextStream(tokenizer, ids[:3])
    deltas = [stream.push([i]) for i in ids[3:]]
    assert "".join(deltas) + stream.flush() == tokenizer.decode(ids[3:])
    assert all("\ufffd" not in d for d in deltas)

