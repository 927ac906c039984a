"""The main job, end to end: lazysnap serving a containerd it configures, with a demo
image pulled lazily and run through it.

Steps (each printed as it runs): start a docker-registry on 127.0.0.1; start
``lazysnap serve`` and a containerd whose config registers it as the proxy snapshotter
``lazysnap``; build a three-layer demo image from local files (static busybox plus data),
push it, convert it to eStargz with ``ctr-remote image convert --estargz --oci`` and push
that; ``ctr-remote image rpull --snapshotter lazysnap`` (layers become remote snapshots,
no layer blob is downloaded); ``ctr run --snapshotter lazysnap`` the image; show the
snapshots and what was fetched. Everything lives under a temporary directory and is
stopped at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.demo import push_demo  # noqa: E402
from tests.e2e.harness import Containerd, Lazysnap, Registry, require_tools  # noqa: E402
from tests.e2e.procs import unmount_all_under  # noqa: E402


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", action="store_true", help="leave everything running")
    args = ap.parse_args()
    require_tools()
    work = Path(tempfile.mkdtemp(prefix="lazysnap-demo-"))
    registry = Registry(work / "registry")
    lazysnap = Lazysnap(work / "lazysnap", socket=work / "lazysnap.sock", root=work / "root",
                        log_level="info")
    containerd = Containerd(work / "containerd", proxy_socket=work / "lazysnap.sock")
    try:
        step(f"registry on 127.0.0.1, lazysnap and containerd under {work}")
        registry.start()
        lazysnap.start()
        containerd.start()
        step("build and push the demo image (3 layers), convert it to eStargz")
        demo = push_demo(registry.host)
        ref = demo.image.reference
        esgz = ref + "-esgz"
        containerd.pull(ref, snapshotter="overlayfs")
        containerd.ctr("image", "convert", "--estargz", "--oci", ref, esgz, binary="ctr-remote")
        containerd.ctr("image", "push", "--plain-http", esgz)
        containerd.ctr("image", "rm", ref, esgz)
        containerd.ctr("content", "prune", "references", check=False)
        step(f"lazy pull: ctr-remote image rpull --snapshotter lazysnap {esgz}")
        started = time.monotonic()
        containerd.rpull(esgz, snapshotter="lazysnap")
        print(f"pulled in {time.monotonic() - started:.2f}s")
        print(containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls").stdout)
        step("ctr run --snapshotter lazysnap: the container reads its files on demand")
        out = containerd.run_container(
            esgz, "demo", "sh", "-c",
            "cat /data/hello.txt; md5sum /data/big.bin; ls /data | wc -l",
            snapshotter="lazysnap")
        print(out.stdout)
        step("mounts and daemons")
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if "fuse.lazysnap" in line:
                print(" ", line.split()[4])
        print(f"lazysnap log: {lazysnap.log_path}")
        if args.keep:
            print(f"\nleft running; containerd socket {containerd.workdir}")
            return 0
    finally:
        if not args.keep:
            containerd.stop()
            lazysnap.stop()
            lazysnap.cleanup()
            registry.stop()
            unmount_all_under(work)
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
