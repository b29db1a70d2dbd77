"""BENCHMARKS.md's model x runtime table from the model-zoo check's figures:
``EDGE_PIPELINE_ZOO_OUT=zoo.jsonl pytest -m zoo`` then ``python tests/zoo_table.py zoo.jsonl``."""

import json
import sys

SHORT = {"executorch-xnnpack-int8": "ExecuTorch", "ort-mobile-int8": "ONNX Runtime", "tflite-int8": "LiteRT"}


def table(lines: list[str]) -> str:
    out = ["| model | runtime | fp32 top-1 | int8 top-1 | int8 − fp32 (points) | top-1 agreement | int8 p50 ms | "
           "int8 p50 / fp32 p50 | what failed |", "|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        run = json.loads(line)
        for r in run["targets"]:
            name = SHORT.get(r["target"], r["target"])
            if "error" in r:
                out.append(f"| {run['model']} | {name} | {run['fp32']:.1%} | – | – | – | – | – | "
                           f"not lowered: {r['where']} |")
                continue
            ratio = r.get("p50_ratio")
            notes = "; ".join(f for f in dict.fromkeys(r["failures"]) if not f.startswith("int8 diagnosis")) or "–"
            if r.get("activations") == "dynamic":
                notes += " (activations quantized per inference)"
            if r.get("float_for_lowering"):
                notes += f" (float to lower: {len(r['float_for_lowering']['layers'])} modules)"
            out.append(f"| {run['model']} | {name} | {run['fp32']:.1%} | {r['test_metric']:.1%} | "
                       f"{-100 * r['drop']:+.1f} | {r['agreement']:.1%} | {r['p50_ms']:.3f} | "
                       f"{'–' if ratio is None else f'{ratio:.2f}'} | {notes} |")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table([ln for ln in f if ln.strip()]))
