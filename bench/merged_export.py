"""Host memory of the merged export: peak RSS of `export_merged` on a multi-shard model, now and before.

"new" is this tree's `export/merged.py` (each shard written as soon as it fills); "old" is the code of commit
e69c0f2 (`qloraga/export.py`, every shard kept until the last was built), extracted with `git archive` into
bench/results/tmp and put first on the child's PYTHONPATH, so no old code lives in the repository. Both
export the same random bf16 Llama, loaded in 4-bit NF4 with a plain LoRA adapter (random B, so the update
is not zero), with `SHARD_BYTES` set small enough for several shards. Each run is a fresh process that loads
the model, copies it into its own memory, restarts its VmHWM counter (host memory on a GPU machine too: the
export moves every merged tensor to the host) and exports; the table quotes the peak RSS, the RSS before
the export, and the difference, which is what the export itself holds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import common

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
OLD_COMMIT = "e69c0f2"  # the last commit whose write_merged kept every shard in memory


def old_tree(commit: str) -> Path:
    """The `qloraga` package of `commit`, extracted once under bench/results/tmp (a folder for PYTHONPATH)."""
    path = common.TMP / f"qloraga-{commit}"
    if not (path / "qloraga" / "__init__.py").exists():
        path.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "qloraga"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    return path


def child(spec: dict) -> dict:
    """One export in this process: load, wrap, restart the host peak counter, export, read the shards."""
    common.setup_child()
    import importlib

    import torch

    import qloraga

    model = common.load(spec["model"], four_bit=True)
    common.materialize(model)
    peft_model = common.plain_lora_model(model, r=spec["r"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    try:  # where SHARD_BYTES lives: qloraga/export/merged.py now, qloraga/export.py at e69c0f2
        module = importlib.import_module("qloraga.export.merged")
    except ModuleNotFoundError:
        module = importlib.import_module("qloraga.export")
    module.SHARD_BYTES = spec["shard_bytes"]
    out = Path(tempfile.mkdtemp(dir=spec["tmp"])) / "merged"
    common.release_memory()
    Path("/proc/self/clear_refs").write_text("5")  # host VmHWM, also on a GPU machine
    before = common.proc_status_gb("VmRSS")
    _, stats = common.measure(lambda: qloraga.export_merged(peft_model, out))
    peak = common.proc_status_gb("VmHWM")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    result = {"peak_gb": peak, "before_gb": before, "export_gb": peak - before, "seconds": stats["seconds"],
              "shards": len(set(index["weight_map"].values())),
              "merged_gb": index["metadata"]["total_size"] / 2**30, "qloraga": str(Path(qloraga.__file__).parent)}
    shutil.rmtree(out.parent)
    return result


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--shape", default="medium", choices=list(common.SHAPES))
    p.add_argument("--shard-mb", type=float, default=64.0, help="SHARD_BYTES of both variants, in MiB")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--old-commit", default=OLD_COMMIT, help="the commit the 'old' variant runs")
    args = p.parse_args()
    if common.serve_child(args, child):
        return
    if args.tiny:
        args.shape, args.shard_mb, args.repeats, args.r = "tiny", 0.05, 1, 2
    tmp = common.TMP / "merged_export"
    tmp.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(common.random_model(args.shape)), "shard_bytes": int(args.shard_mb * 2**20), "r": args.r,
            "tmp": str(tmp)}
    envs = {"new": {}, "old": {"PYTHONPATH": str(old_tree(args.old_commit))}}
    runs: dict[str, list[dict]] = {name: [] for name in envs}
    for i in range(args.repeats):  # the variants take turns, so a slower phase of the machine hits both
        for name in common.rotated(list(envs), i):
            # --tiny: "new" in this process (the smoke test pays one interpreter start, for "old")
            inprocess = child if args.tiny and name == "new" else None
            runs[name].append(common.run_child(SCRIPT, spec, inprocess, env=envs[name]))
    results = {}
    for name, rs in runs.items():
        expected = ROOT / "qloraga" if name == "new" else Path(envs["old"]["PYTHONPATH"]) / "qloraga"
        if any(Path(r["qloraga"]) != expected for r in rs):
            raise RuntimeError(f"the {name!r} runs imported qloraga from {rs[0]['qloraga']}, not {expected}")
        results[name] = {k: common.median([r[k] for r in rs]) for k in ("peak_gb", "before_gb", "export_gb",
                                                                         "seconds")}
        results[name] |= {"shards": rs[0]["shards"], "merged_gb": rs[0]["merged_gb"], "runs": rs}
    labels = {"new": "new: each shard written as it fills", "old": f"old ({args.old_commit}): all shards held"}
    rows = [{"code": labels[name], "shards": res["shards"], "merged GiB": res["merged_gb"],
             "peak GiB": res["peak_gb"], "before export GiB": res["before_gb"], "export GiB": res["export_gb"],
             "export s": res["seconds"]} for name, res in results.items()]
    ratio = results["new"]["export_gb"] / results["old"]["export_gb"]
    params = common.count_params(common.llama_config(args.shape))
    print(f"Shape {args.shape} ({params['total'] / 1e6:.0f}M parameters), 4-bit base + LoRA r={args.r}, "
          f"SHARD_BYTES={args.shard_mb:g} MiB, median of {args.repeats} fresh processes each\n")
    print(common.table(rows, list(rows[0])))
    print(f"\nexport GiB, new / old: {ratio:.3f}")
    payload = {"shape": args.shape, "params": params, "r": args.r, "shard_bytes": spec["shard_bytes"],
               "old_commit": args.old_commit, "repeats": args.repeats, "memory_kind": "peak RSS (VmHWM) of a "
               "fresh process, host memory", "results": results, "rows": rows, "export_ratio_new_old": ratio}
    print(f"\nwrote {common.save(args.out, 'merged_export' + ('_tiny' if args.tiny else ''), payload)}")


if __name__ == "__main__":
    main()
