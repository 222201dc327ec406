"""Post-process `ncu --page source --print-source sass --csv` output (stdin): the SASS lines with the most warp
stall samples, with their share of all samples.   ncu ... --page source --csv --print-source sass CMD | python3 this"""
import csv
import sys

rows = [r for r in csv.reader(line for line in sys.stdin if line.startswith('"')) if r and r[0] != "Kernel Name"]
header, body = rows[0], rows[1:]
col = next((i for i, h in enumerate(header) if "Sampl" in h and "All" in h), None)
if col is None:
    col = next(i for i, h in enumerate(header) if "Sampl" in h or "stall" in h.lower())
src = next(i for i, h in enumerate(header) if h == "Source")
addr = next((i for i, h in enumerate(header) if h == "Address"), 0)
total = sum(float(r[col] or 0) for r in body if len(r) > col) or 1.0
print("columns:", [h for h in header if "Sampling" in h or "Stall" in h][:6])
ranked = sorted((r for r in body if len(r) > col), key=lambda r: -float(r[col] or 0))
for r in ranked[:int(sys.argv[1]) if len(sys.argv) > 1 else 40]:
    print(f"{100 * float(r[col] or 0) / total:5.1f}%  {r[addr]}  {r[src][:110]}")
