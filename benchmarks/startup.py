"""Start-up time of the CLI (issue 17): ``--help`` and the README's first demo command, before/after.

    python benchmarks/startup.py run --before 8c5500d --after c4d9441 --json benchmarks/results/startup.json
    python benchmarks/startup.py run --before /path/to/old/tree --runs 5   # after: this working tree
    python benchmarks/startup.py table benchmarks/results/startup.json

Each measurement is the wall time of one fresh process, as a person at a shell sees it:

- ``help``: ``python -m mlx_qwenvl --help``;
- ``demo``: the README's first demo command (the ``mlx-qwenvl generate ...`` line of its first
  ```` ```bash ```` block, read from the "after" tree's README), run as ``python -m mlx_qwenvl
  generate ...`` from the tree's root, so that the image path is the README's;
- ``mlx-vlm demo``: ``python -m mlx_vlm generate`` on the same demo folder, image and prompt
  (``--max-tokens 8 --temperature 0``), for comparison;
- ``python -c pass``: the interpreter alone, the floor under everything.

A tree's code is run with ``python -m`` and that tree as the working directory: the working
directory comes first on ``sys.path``, so that tree's ``mlx_qwenvl`` is imported whatever is
installed (checked: each tree's ``mlx_qwenvl.__file__`` is written into the JSON). ``--before``
and ``--after`` are folders, or git revisions of this repository checked out in temporary
worktrees (removed at the end); ``--after`` defaults to this working tree, uncommitted changes
included (the JSON says whether it was dirty). One untimed warm-up round (bytecode caches, page cache) precedes ``--runs``
timed rounds in which the systems take turns, so that a change in the machine's load falls on all
of them. Besides wall time, each process's CPU time (user + sys, from ``getrusage`` of the
children) is recorded: on a shared machine it varies less than wall time. Finally ``python -X
importtime`` of ``import mlx_qwenvl.cli`` and of each demo command, ``--importtime-runs`` times,
says where the time goes (medians per package). See benchmarks/README.md.
"""

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench import fmt, machine, plain_ratio, stats  # noqa: E402

MLX_VLM_EXTRA = ["--max-tokens", "8", "--temperature", "0"]
# Packages whose first import is reported by name (cumulative time of that import, and the chain
# of imports that pulled it in).
PACKAGES = ("mlx", "mlx.core", "mlx.nn", "mlx_lm", "mlx_lm.generate", "mlx_lm.tokenizer_utils", "transformers",
            "torch", "huggingface_hub", "tokenizers", "numpy", "PIL", "click", "jinja2", "safetensors",
            "scipy", "cv2", "datasets", "mlx_vlm", "mlx_vlm.generate", "mlx_qwenvl", "mlx_qwenvl.cli",
            "mlx_qwenvl.generate", "mlx_qwenvl.loading", "mlx_qwenvl.processor", "mlx_qwenvl.model")


# --------------------------------------------------------------------------------------------
# the commands


def readme_demo(tree: Path) -> list:
    """argv of the first ``mlx-qwenvl generate`` line in the README's first ```bash block."""
    text = (tree / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    if not block:
        raise SystemExit(f"no ```bash block in {tree / 'README.md'}")
    for line in block.group(1).splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:2] == ["mlx-qwenvl", "generate"]:
            return argv
    raise SystemExit(f"no 'mlx-qwenvl generate' line in the first ```bash block of {tree / 'README.md'}")


def option(argv, name):
    return argv[argv.index(name) + 1]


def child_env() -> dict:
    env = dict(os.environ)
    # The tree comes from the working directory; nothing else may put another copy first.
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONSTARTUP", None)
    env.pop("MLX_QWENVL_NO_BLAS", None)
    return env


def timed(python, args, cwd, env) -> dict:
    """One fresh process: wall and CPU seconds, exit code, output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    proc = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            "load1": os.getloadavg()[0]}


def which_package(python, tree, env) -> str:
    proc = subprocess.run([python, "-c", "import mlx_qwenvl; print(mlx_qwenvl.__file__)"], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)
    path = Path(proc.stdout.strip()).resolve()
    if Path(tree).resolve() not in path.parents:
        raise SystemExit(f"python -m from {tree} imports {path}, not that tree's package")
    return str(path)


def versions(python, env) -> dict:
    code = ("import json\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
            "for p in ('mlx', 'mlx-lm', 'mlx-vlm', 'transformers', 'torch', 'numpy', 'click'):\n"
            "    try: out[p] = version(p)\n    except PackageNotFoundError: out[p] = None\n"
            "import importlib.util\nout['torch importable'] = importlib.util.find_spec('torch') is not None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True,
                          cwd=tempfile.gettempdir())
    return json.loads(proc.stdout)


def git(tree, *args) -> str:
    return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------------------------
# -X importtime


def parse_importtime(stderr: str) -> list:
    """Entries (name, depth, self_s, cumulative_s, chain) in the order Python prints them."""
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S.*)$", line)
        if m:
            rows.append({"name": m.group(4).strip(), "depth": (len(m.group(3)) - 1) // 2,
                         "self_s": int(m.group(1)) / 1e6, "cumulative_s": int(m.group(2)) / 1e6})
    # Children are printed before their parent: an entry's parent is the next one a level up.
    for i, row in enumerate(rows):
        chain, depth = [], row["depth"]
        for later in rows[i + 1:]:
            if later["depth"] < depth:
                chain.append(later["name"])
                depth = later["depth"]
                if depth == 0:
                    break
        row["chain"] = chain  # nearest importer first
    return rows


def importtime_summary(rows: list, top: int = 15) -> dict:
    by_name = {}
    for row in rows:
        by_name.setdefault(row["name"], row)  # the first import pays
    return {
        "total_s": sum(r["cumulative_s"] for r in rows if r["depth"] == 0),
        "modules": len(rows),
        "packages": {name: {"cumulative_s": by_name[name]["cumulative_s"],
                            "imported_by": " <- ".join(by_name[name]["chain"][:4])}
                     for name in PACKAGES if name in by_name},
        "top": [{k: r[k] for k in ("name", "depth", "self_s", "cumulative_s")} |
                {"imported_by": " <- ".join(r["chain"][:3])}
                for r in sorted(rows, key=lambda r: -r["cumulative_s"])[:top]],
    }


def importtime(python, args, cwd, env, runs) -> dict:
    summaries = []
    for _ in range(runs):
        proc = subprocess.run([python, "-X", "importtime", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"-X importtime {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
        summaries.append(importtime_summary(parse_importtime(proc.stderr)))
    totals = [s["total_s"] for s in summaries]
    middle = summaries[sorted(range(runs), key=lambda i: totals[i])[runs // 2]]
    packages = {}
    for name in middle["packages"]:
        values = [s["packages"][name]["cumulative_s"] for s in summaries if name in s["packages"]]
        packages[name] = {"cumulative_s": stats(values), "imported_by": middle["packages"][name]["imported_by"]}
    return {"command": ["python", "-X", "importtime", *args], "runs": runs, "total_s": stats(totals),
            "modules": middle["modules"], "packages": packages, "top_of_median_run": middle["top"]}


# --------------------------------------------------------------------------------------------
# the protocol


def resolve_tree(spec: str, name: str, stack: list) -> Path:
    """A folder as it is, or a git revision of this repository checked out in a temporary worktree."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    tmp = Path(tempfile.mkdtemp(prefix=f"startup-{name}-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tmp), spec], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    stack.append(tmp)
    return tmp


def run(args) -> dict:
    env = child_env()
    python = args.python
    worktrees = []
    try:
        after = resolve_tree(args.after, "after", worktrees)
        before = resolve_tree(args.before, "before", worktrees) if args.before else None
        trees = {name: tree for name, tree in (("before", before), ("after", after)) if tree is not None}
        demo = readme_demo(after)
        image, prompt = option(demo, "--image"), option(demo, "--prompt")
        demo_folder = after / "mlx_qwenvl" / "demo_model" if option(demo, "--model") == "demo" else \
            Path(option(demo, "--model")).resolve()

        info = versions(python, env)
        report = {
            "kind": "startup",
            "machine": machine() | {"python_executable": python, "versions": info},
            "trees": {name: {"path": str(tree), "commit": git(tree, "rev-parse", "--short", "HEAD"),
                             "subject": git(tree, "log", "-1", "--format=%s")[:120],
                             "mlx_qwenvl": which_package(python, tree, env),
                             "dirty": bool(git(tree, "status", "--porcelain", "--untracked-files=no"))}
                      for name, tree in trees.items()},
            "readme_demo": shlex.join(demo),
            "protocol": {"runs": args.runs, "warmup_rounds": 1, "order": "systems take turns within each round",
                         "timing": "wall time of a fresh process (perf_counter around subprocess.run); "
                                   "CPU time = user + sys of the child (getrusage)",
                         "env": "PYTHONPATH, PYTHONSTARTUP and MLX_QWENVL_NO_BLAS unset"},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_before": os.getloadavg(),
        }

        cases = {"python -c pass": {"python": (["-c", "pass"], after)}}
        cases["--help"] = {name: (["-m", "mlx_qwenvl", "--help"], tree) for name, tree in trees.items()}
        cases["demo"] = {name: (["-m", "mlx_qwenvl", *demo[1:]], tree) for name, tree in trees.items()}
        want_vlm = not args.no_mlx_vlm
        if want_vlm and not info.get("mlx-vlm"):
            print("mlx-vlm is not installed for this python (pip install -e '.[bench]'): skipping it", file=sys.stderr)
            want_vlm = False
        if want_vlm:
            cases["demo"]["mlx-vlm"] = (["-m", "mlx_vlm", "generate", "--model", str(demo_folder), "--image",
                                         str((after / image).resolve()), "--prompt", prompt, *MLX_VLM_EXTRA], after)
        report["commands"] = {case: {system: "cd " + shlex.quote(str(cwd)) + " && " + shlex.join(["python", *argv])
                                     for system, (argv, cwd) in systems.items()} for case, systems in cases.items()}

        samples = {case: {system: [] for system in systems} for case, systems in cases.items()}
        answers = {case: {} for case in cases}
        for round_index in range(args.runs + 1):
            label = "warm-up" if round_index == 0 else f"run {round_index}/{args.runs}"
            for case, systems in cases.items():
                for system, (argv, cwd) in systems.items():
                    r = timed(python, argv, cwd, env)
                    print(f"[{time.strftime('%H:%M:%S')}] {label}: {case} / {system}: {r['wall_s']:.3f} s wall, "
                          f"{r['cpu_s']:.3f} s CPU, load {r['load1']:.2f}", flush=True)
                    if r["rc"] != 0:
                        raise RuntimeError(f"{case} / {system} failed ({r['rc']}):\n{(r['stderr'] or r['stdout'])[-3000:]}")
                    if case == "demo":
                        answer = r["stdout"].strip()
                        answers[case].setdefault(system, answer)
                        if answer != answers[case][system]:
                            raise RuntimeError(f"{system} answered {answer!r}, earlier {answers[case][system]!r}")
                    if round_index:
                        samples[case][system].append({k: r[k] for k in ("wall_s", "cpu_s", "load1")})
        report["answers"] = answers["demo"]
        report["samples"] = samples

        imports = {}
        for name, tree in trees.items():
            imports[f"import mlx_qwenvl.cli / {name}"] = importtime(python, ["-c", "import mlx_qwenvl.cli"], tree, env,
                                                                    args.importtime_runs)
            imports[f"demo / {name}"] = importtime(python, cases["demo"][name][0], tree, env, args.importtime_runs)
        if want_vlm:
            imports["demo / mlx-vlm"] = importtime(python, cases["demo"]["mlx-vlm"][0], after, env,
                                                   args.importtime_runs)
        report["importtime"] = imports
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        report["load_after"] = os.getloadavg()
        report["summary"] = summarize(report)
        return report
    finally:
        for tree in worktrees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
            try:
                tree.parent.rmdir()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# summaries and tables


def summarize(report: dict) -> dict:
    out = {}
    for case, systems in report["samples"].items():
        out[case] = {system: {"wall_s": stats([s["wall_s"] for s in values]), "cpu_s": stats([s["cpu_s"] for s in values])}
                     for system, values in systems.items()}
    ratios = {}
    for case in ("--help", "demo"):
        s = out.get(case, {})
        for key in ("wall_s", "cpu_s"):
            if "before" in s and "after" in s:
                ratios[f"{case} {key}: after / before"] = plain_ratio(s["after"][key], s["before"][key])
            if "mlx-vlm" in s and "after" in s:
                ratios[f"{case} {key}: after / mlx-vlm"] = plain_ratio(s["after"][key], s["mlx-vlm"][key])
    return {"times": out, "ratios": ratios}


def table(report: dict) -> str:
    summary = summarize(report)
    times, ratios = summary["times"], summary["ratios"]
    m, trees = report["machine"], report["trees"]
    names = [n for n in ("before", "after", "mlx-vlm") if any(n in s for s in times.values())]
    heads = {"before": f"before ({trees['before']['commit']})" if "before" in trees else "before",
             "after": f"after ({trees['after']['commit']})" if "after" in trees else "after", "mlx-vlm": "mlx-vlm"}
    torch = "torch installed" if m["versions"].get("torch importable") else "no torch"
    lines = [f"**Start-up** ({m.get('cpu')}, {m.get('cpus')} CPUs; python {m.get('python')}, mlx "
             f"{m['versions'].get('mlx')}, mlx-lm {m['versions'].get('mlx-lm')}, transformers "
             f"{m['versions'].get('transformers')}, {torch}; median [min–max] of {report['protocol']['runs']} fresh "
             f"processes, seconds)", ""]
    compared = [c for c in ("before", "mlx-vlm") if c in names and "after" in names]
    for key, label in (("wall_s", "wall time (s)"), ("cpu_s", "CPU time, user + sys (s)")):
        lines += [f"| {label} | " + " | ".join(heads[n] for n in names) + "".join(f" | after / {c}" for c in compared)
                  + " |", "|---|" + "---|" * (len(names) + len(compared))]
        for case in ("--help", "demo"):
            s = times.get(case, {})
            cells = [fmt(s[n][key]) if n in s else "–" for n in names]
            cells += [fmt(ratios.get(f"{case} {key}: after / {c}")) for c in compared]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        floor = times.get("python -c pass", {}).get("python")
        if floor:
            lines.append(f"| `python -c pass` (floor) | {fmt(floor[key])} |" + " |" * (len(names) + len(compared) - 1))
        lines.append("")
    imports = report.get("importtime", {})
    if imports:
        lines += ["Imports (`python -X importtime`, cumulative seconds of each package's first import, median of "
                  f"{next(iter(imports.values()))['runs']} runs; – = not imported):", ""]
        cols = list(imports)
        shown = [p for p in PACKAGES if any(p in imports[c]["packages"] for c in cols)
                 and max(imports[c]["packages"][p]["cumulative_s"]["median"] for c in cols if p in imports[c]["packages"]) >= 0.02]
        lines += ["| package | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines.append("| **all imports** | " + " | ".join(f"{imports[c]['total_s']['median']:.3f}" for c in cols) + " |")
        for p in shown:
            lines.append(f"| {p} | " + " | ".join(
                f"{imports[c]['packages'][p]['cumulative_s']['median']:.3f}" if p in imports[c]["packages"] else "–"
                for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="time --help and the README demo, before/after, and mlx-vlm's generate")
    r.add_argument("--before", help="the old tree: a folder, or a git revision (checked out in a temporary worktree)")
    r.add_argument("--after", default=str(ROOT),
                   help="the new tree: a folder or a git revision (default: this repository's working tree as it is)")
    r.add_argument("--python", default=sys.executable, help="the interpreter whose packages are measured")
    r.add_argument("--no-mlx-vlm", action="store_true", help="leave out mlx-vlm's generate")
    r.add_argument("--runs", type=int, default=5, help="timed rounds (after one untimed warm-up round)")
    r.add_argument("--importtime-runs", type=int, default=3)
    r.add_argument("--json", type=Path, help="write the results here")
    t = sub.add_parser("table", help="print the tables of result files")
    t.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "table":
        for file in args.files:
            print(table(json.loads(file.read_text())))
        return
    report = run(args)
    text = table(report)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
