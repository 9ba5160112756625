#!/usr/bin/env python3
"""Before and after: runs bench.py for two sets of binaries, alternated in
A B B A order (so neither build always runs first: on these two shared
cores the second of two back-to-back runs reads worse whichever build it
is, bench/RESULTS.md), and prints each row's values for both side by side
with the median of each and their quotient.

    sudo bench/ab.py BEFORE AFTER [--rounds 2] [bench.py arguments, e.g. --quick --no-windows --only tcp,latency]

BEFORE and AFTER are directories holding release builds of host-switch,
vm-switch and rdnet-bench, or git revisions, which are built first (in a
temporary worktree, with a target directory of their own under
/tmp/rdnet-ab: one shared with this checkout would be left holding the
revision's binaries) and copied to /tmp/rdnet-ab/REV. Needs root, as
bench.py does.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ("host-switch", "vm-switch", "rdnet-bench")


def binaries(spec):
    """A directory with the three binaries: `spec` itself, or the build of
    the git revision `spec`."""
    if os.path.isdir(spec):
        missing = [b for b in BINARIES if not os.path.exists(os.path.join(spec, b))]
        if missing:
            sys.exit(f"{spec}: no {', '.join(missing)}")
        return spec
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", spec], capture_output=True, text=True)
    if rev.returncode != 0:
        sys.exit(f"{spec}: neither a directory nor a git revision")
    rev = rev.stdout.strip()
    out = os.path.join("/tmp/rdnet-ab", rev)
    if all(os.path.exists(os.path.join(out, b)) for b in BINARIES):
        return out
    tree = tempfile.mkdtemp(prefix=f"rdnet-ab-{rev}-")
    target = "/tmp/rdnet-ab/target"
    try:
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, rev], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cargo", "build", "--release", "--locked", "--bins"], cwd=tree, check=True,
                       env={**os.environ, "CARGO_TARGET_DIR": target})
        os.makedirs(out, exist_ok=True)
        for b in BINARIES:
            shutil.copy2(os.path.join(target, "release", b), out)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], stdout=subprocess.DEVNULL)
        shutil.rmtree(tree, ignore_errors=True)
    return out


def run(directory, args):
    """One bench.py run with `directory`'s binaries: its rows."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "RDNET_BENCH_BIN": directory}
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench.py"), *args, "--json", f.name],
                       env=env, check=True)
        with open(f.name) as rows:
            return json.load(rows)


def shown(value, unit):
    if value is None:
        return "n/a"
    if unit == "Gbit/s":
        return f"{value / 1e9:.2f}"
    if isinstance(value, float) and abs(value) < 10:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="directory of binaries or git revision")
    ap.add_argument("after", help="directory of binaries or git revision")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs, the second of every two with AFTER first (default 2)")
    ap.add_argument("--notes", action="store_true", help="also print each run's note under its row (loss, shares)")
    a, rest = ap.parse_known_args()
    dirs = {"A": binaries(a.before), "B": binaries(a.after)}
    results = {"A": [], "B": []}
    for r in range(max(1, a.rounds)):
        for side in ("AB" if r % 2 == 0 else "BA"):
            print(f"== round {r + 1}: {side} ({a.before if side == 'A' else a.after})", flush=True)
            results[side].append(run(dirs[side], rest))
    names = []
    for runs in results.values():
        for rows in runs:
            names += [row["name"] for row in rows if row["name"] not in names]
    print()
    print(f"A = {a.before}, B = {a.after}; values in run order, then the medians' quotient (B / A); "
          "ratios to veth in brackets")
    print(f"  {'row':<52} {'A':<34} {'B':<34} B/A")
    for name in names:
        cells, medians = [], []
        for side in "AB":
            found = [row for rows in results[side] for row in rows if row["name"] == name]
            values = [row["value"] for row in found if row["value"] is not None]
            unit = found[0]["unit"] if found else ""
            text = " ".join(shown(row["value"], unit) + (f" [{row['ratio']:.2f}]" if row["ratio"] else "")
                            for row in found)
            cells.append(text)
            medians.append(statistics.median(values) if values else None)
        quotient = f"{medians[1] / medians[0]:.2f}" if medians[0] and medians[1] is not None else ""
        print(f"  {name:<52} {cells[0]:<34} {cells[1]:<34} {quotient}")
        if a.notes:
            for side in "AB":
                for rows in results[side]:
                    for row in rows:
                        if row["name"] == name and row["note"]:
                            print(f"      {side}: {row['note']}")


if __name__ == "__main__":
    main()
