"""Regenerate ``protocol/swarm_pb2.py`` and ``protocol/swarm_pb2_grpc.py`` from ``protocol/swarm.proto``.

Run ``python -m protocol.generate`` after editing the .proto; tests/test_protos.py fails while the
checked-in modules are stale. Paths are relative to the repository root so that the generated gRPC
module imports ``from protocol import swarm_pb2``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protocol/swarm.proto"
OUTPUTS = ("protocol/swarm_pb2.py", "protocol/swarm_pb2_grpc.py")


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Compile the proto into ``out_dir`` (the repository root by default); returns the written files."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", str(ROOT / PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
    return [out_dir / name for name in OUTPUTS]


if __name__ == "__main__":
    for path in generate():
        print(f"wrote {path.relative_to(ROOT)}")
    sys.exit(0)
