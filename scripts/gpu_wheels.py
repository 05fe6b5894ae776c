"""Wheels for the lent H200 machine: everything the GPU check imports that its image lacks.

The machine has no network; what it lacks travels inside the working tree as wheels in ``.whl/``
(git-ignored through .git/info/exclude), at most 64 MiB per device call together with the tree. Its
python3 is CPython 3.12 on manylinux x86_64, so every wheel here must install there.

    .venv/bin/python scripts/gpu_wheels.py            # fill .whl/, then prove the set resolves
    .venv/bin/python scripts/gpu_wheels.py --check    # only the proof (no download)

What is carried: the roots (DeepSpeed at the version our venv runs, built from its sdist without ops:
``pip download --only-binary=:all: deepspeed`` would silently take 0.3.1, the only binary on the
index; Hydra, OmegaConf, its ANTLR runtime, W&B) and, recursively, every requirement of theirs (markers
evaluated for CPython 3.12 on Linux x86_64, extras followed) that is not in scripts/h200_packages.txt.
Versions: the one our venv has when it satisfies every requirement seen, else the newest that does.
A package that has only an sdist is built here with ``pip wheel`` and must come out pure Python.

The proof: ``pip install --dry-run --no-index`` for Python 3.12 / manylinux / binary only, over
``.whl/`` plus metadata-only stand-ins for the machine's own packages (at the versions
scripts/h200_packages.txt names, else our venv's), must resolve the whole set.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
PRESENT_FILE = REPO / "scripts" / "h200_packages.txt"
ROOTS = ("deepspeed", "hydra-core", "omegaconf", "antlr4-python3-runtime", "wandb")
# Built from the sdist, never downloaded as a binary (see the module docstring).
BUILD_FROM_SDIST = {"deepspeed"}
# What the device tool carries per call (working tree included); the tree itself is < 1 MiB.
BUDGET_MIB = 56
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# The target interpreter, for environment markers.
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def pip_target_flags() -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp312"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def read_present(path: Path = PRESENT_FILE) -> dict[str, str | None]:
    """The machine's packages: canonical name -> version if known."""
    present: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            present[canonicalize_name(name)] = version or None
    return present


def wheel_requirements(wheel: Path) -> list[str]:
    """``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = zf.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def applies(req: Requirement, extras: Iterable[str]) -> bool:
    """Whether ``req`` is needed on the target with these extras of its parent requested."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in (list(extras) or [""]))


def wheel_fits_target(wheel: Path) -> bool:
    """A wheel the target (CPython 3.12, manylinux x86_64) can install."""
    _, _, _, tags = parse_wheel_filename(wheel.name)
    for tag in tags:
        interp_ok = tag.interpreter in ("py3", "cp312") or tag.interpreter.startswith("py3")
        abi_ok = tag.abi in ("none", "abi3", "cp312")
        plat_ok = (
            tag.platform == "any" or tag.platform in PLATFORMS or re.fullmatch(r"manylinux_2_\d+_x86_64", tag.platform)
        )
        if tag.abi == "abi3" and tag.interpreter.startswith("cp"):
            interp_ok = int(tag.interpreter[3:] or 0) <= 12
        if interp_ok and abi_ok and plat_ok:
            return True
    return False


def local_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wheels_in(folder: Path) -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in sorted(folder.glob("*.whl"))}


def fetch(name: str, spec: SpecifierSet, folder: Path) -> Path:
    """Put one wheel of ``name`` satisfying ``spec`` into ``folder`` (no dependencies)."""
    version = local_version(name)
    pin = f"{name}=={version}" if version and spec.contains(version, prereleases=True) else f"{name}{spec}"
    before = set(folder.glob("*.whl"))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    if canonicalize_name(name) in BUILD_FROM_SDIST:
        cmd = pip + ["wheel", "-q", "--no-deps", "--no-binary", name, "-w", str(folder), pin]
        subprocess.run(cmd, check=True, env={**env, "DS_BUILD_OPS": "0"})
    else:
        cmd = pip + ["download", "-q", "--no-deps", *pip_target_flags(), "-d", str(folder), pin]
        if subprocess.run(cmd, env=env).returncode != 0:  # no binary for the target: build the sdist
            print(f"{pin}: no wheel for CPython 3.12 manylinux; building it from its sdist", flush=True)
            cmd = pip + ["wheel", "-q", "--no-deps", "--no-binary", name, "-w", str(folder), pin]
            subprocess.run(cmd, check=True, env=env)
    new = sorted(set(folder.glob("*.whl")) - before)
    if len(new) != 1:
        raise SystemExit(f"{pin}: expected one new wheel in {folder}, got {[w.name for w in new]}")
    if not wheel_fits_target(new[0]):
        new[0].unlink()
        raise SystemExit(f"{pin}: built {new[0].name}, which CPython 3.12 manylinux x86_64 cannot install")
    return new[0]


def collect(folder: Path, present: dict[str, str | None], roots: Iterable[str] = ROOTS, fetcher=fetch):
    """Fill ``folder`` with the roots and their missing requirements; returns (carried, present specs).

    ``carried``: canonical name -> wheel path. ``present specs``: what the carried wheels ask of the
    machine's own packages (canonical name -> SpecifierSet), to check against their versions.
    """
    folder.mkdir(parents=True, exist_ok=True)
    have = wheels_in(folder)
    specs: dict[str, SpecifierSet] = {}
    extras: dict[str, set[str]] = {}
    queue: list[tuple[str, SpecifierSet, set[str]]] = []
    for root in roots:
        version = local_version(root)
        if version is None and root in ROOTS:  # the wheels follow the versions our tests run with
            raise SystemExit(
                f"{root} is not installed in {sys.prefix}: run `make venv` first, or use the project's venv"
            )
        queue.append((root, SpecifierSet(f"=={version}" if version else ""), set()))
    carried: dict[str, Path] = {}
    while queue:
        name, spec, want_extras = queue.pop(0)
        key = canonicalize_name(name)
        specs[key] = specs.get(key, SpecifierSet()) & spec
        new_extras = want_extras - extras.get(key, set())
        extras.setdefault(key, set()).update(want_extras)
        if key in present:
            continue
        if key in carried and not new_extras:
            version = parse_wheel_filename(carried[key].name)[1]
            if not specs[key].contains(version, prereleases=True):
                raise SystemExit(f"{carried[key].name} does not satisfy {key}{specs[key]}: delete it and rerun")
            continue
        wheel = have.get(key)
        if wheel is not None and not specs[key].contains(parse_wheel_filename(wheel.name)[1], prereleases=True):
            print(f"{wheel.name} does not satisfy {key}{specs[key]}: replacing it", flush=True)
            wheel.unlink()
            wheel = None
        if wheel is None:
            wheel = fetcher(name, specs[key], folder)
            have[key] = wheel
        carried[key] = wheel
        for line in wheel_requirements(wheel):
            req = Requirement(line)
            if applies(req, extras[key]):
                queue.append((req.name, req.specifier, set(req.extras)))
    present_specs = {k: s for k, s in specs.items() if k in present}
    return carried, present_specs


def check_present_versions(present: dict[str, str | None], present_specs: dict[str, SpecifierSet]) -> list[str]:
    """Requirements that the machine's known package versions do not meet."""
    return [
        f"{name}{spec} (the machine has {present[name]})"
        for name, spec in sorted(present_specs.items())
        if present[name] and not spec.contains(present[name], prereleases=True)
    ]


def stub_wheel(folder: Path, name: str, version: str) -> Path:
    """A metadata-only wheel: stands in for a package the machine already has, for the dry run."""
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(
            f"{dist}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: gpu_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def dry_run(
    folder: Path, present: dict[str, str | None], needed: Iterable[str], roots: Iterable[str] = ROOTS
) -> subprocess.CompletedProcess:
    """``pip install --dry-run --no-index`` of the roots for CPython 3.12 manylinux, over ``folder``
    plus stand-ins for the machine's packages that the set needs."""
    with tempfile.TemporaryDirectory() as tmp:
        stubs, target = Path(tmp) / "present", Path(tmp) / "target"
        stubs.mkdir()
        for name in needed:
            version = present.get(name) or local_version(name)
            if version is None:
                raise SystemExit(
                    f"{name}: on the machine, version unknown and not in our venv; add it to {PRESENT_FILE}"
                )
            stub_wheel(stubs, name, version)
        roots = [f"{r}=={local_version(r)}" if local_version(r) else r for r in roots]
        # --isolated: no pip.conf find-links or constraints of this machine take part in the proof.
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--isolated",
            "--dry-run",
            "--no-index",
            "--find-links",
            str(folder),
        ]
        cmd += ["--find-links", str(stubs), *pip_target_flags(), "--target", str(target), *roots]
        print("$ " + " ".join(cmd), flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        return subprocess.run(cmd, capture_output=True, text=True, env={**env, "PIP_CONFIG_FILE": os.devnull})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / ".whl", help="the wheel folder (default .whl)")
    parser.add_argument("--check", action="store_true", help="no downloads: fail if a wheel is missing")
    args = parser.parse_args(argv)
    present = read_present()

    def no_fetch(name: str, spec: SpecifierSet, folder: Path) -> Path:
        raise SystemExit(f"--check: {name}{spec} is missing from {folder}; run scripts/gpu_wheels.py without --check")

    carried, present_specs = collect(args.dir, present, fetcher=no_fetch if args.check else fetch)
    stale = sorted(set(wheels_in(args.dir)) - set(carried))
    if stale:  # two versions of one package stop the machine's `pip install *.whl`; unneeded ones waste the budget
        raise SystemExit(f"{args.dir} holds wheels the set does not need: {stale}; delete them and rerun")
    total = sum(w.stat().st_size for w in carried.values()) / 2**20
    for _, wheel in sorted(carried.items()):
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    print(f"{len(carried)} wheels, {total:.1f} MiB in {args.dir} (budget {BUDGET_MIB} MiB)")
    if total > BUDGET_MIB:
        raise SystemExit(f"the wheels take {total:.1f} MiB, over the {BUDGET_MIB} MiB budget of one device call")
    unmet = check_present_versions(present, present_specs)
    if unmet:
        raise SystemExit("the machine's own packages do not meet: " + "; ".join(unmet))
    proc = dry_run(args.dir, present, present_specs)
    print(proc.stdout[-3000:] + proc.stderr[-3000:])
    if proc.returncode != 0:
        raise SystemExit("the dry run did not resolve (see above)")
    would = re.search(r"Would install (.*)", proc.stdout)
    print(f"dry run resolved: {len(would.group(1).split()) if would else 0} distributions for CPython 3.12 manylinux")


if __name__ == "__main__":
    main()
