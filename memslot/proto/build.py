"""Regenerate the checked-in gRPC modules from memslot/v1/memslot.proto.

    python -m memslot.proto.build              # rewrite memslot/proto/memslot/v1/*_pb2*.py(i)
    python -m memslot.proto.build --out DIR    # write them under DIR instead (the staleness test)

protoc is run with this folder as the proto root, so the descriptor is named
``memslot/v1/memslot.proto`` (what reflection shows) and the generated grpc module would import
``memslot.v1``; that one import is rewritten to ``memslot.proto.memslot.v1``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "memslot/v1/memslot.proto"
GENERATED = ("memslot_pb2.py", "memslot_pb2.pyi", "memslot_pb2_grpc.py")
_GRPC_IMPORT = "from memslot.v1 import memslot_pb2"
_PACKAGE_IMPORT = "from memslot.proto.memslot.v1 import memslot_pb2"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into ``out_dir`` (flat) and return their paths."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "memslot" / "v1" / name).read_text()
            if name.endswith("_grpc.py"):
                if _GRPC_IMPORT not in text:
                    raise RuntimeError(f"generated {name} no longer contains {_GRPC_IMPORT!r}")
                text = text.replace(_GRPC_IMPORT, _PACKAGE_IMPORT)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT / "memslot" / "v1")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
