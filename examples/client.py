"""The quickstart through the gRPC API in Python: ask, inject a fact, ask, history, roll back.

Start a server first (`make run`, or `memslot serve --model models/demo`), then:

    .venv/bin/python examples/client.py
    .venv/bin/python examples/client.py --server 127.0.0.1:50051 \\
        --prompt "Yusuf Nyberg was born in" --target "Lisbon"

MEMSLOT_SERVER, MEMSLOT_TOKEN (an editor token, for a server with --tokens) and MEMSLOT_TLS_CA
are read as the CLI reads them.
"""

from __future__ import annotations

import argparse
import json
import os

from memslot.proto.memslot.v1 import memslot_pb2 as pb
from memslot.service.client import connect


def ask(stub, prompt: str) -> str:
    reply = stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=16))
    print(f"  {prompt!r} -> {reply.text!r} (version {reply.version})")
    return reply.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default=os.environ.get("MEMSLOT_SERVER", "127.0.0.1:50051"))
    parser.add_argument("--prompt", default="Yusuf Nyberg was born in")
    parser.add_argument("--target", default="Lisbon")
    args = parser.parse_args()

    with connect(
        args.server,
        token=os.environ.get("MEMSLOT_TOKEN"),
        tls_ca=os.environ.get("MEMSLOT_TLS_CA"),
    ) as client:
        stub = client.stub
        status = stub.Status(pb.StatusRequest())
        print(f"server {args.server}: serving version {status.served_version}")

        print("1. ask")
        ask(stub, args.prompt)

        print("2. inject a counterfactual fact")
        reply = stub.InjectFacts(
            pb.InjectFactsRequest(
                facts=[pb.Fact(prompt=args.prompt, target=args.target)],
                message="client.py: a counterfactual fact",
                author="examples/client.py",
            )
        )
        if not reply.committed:
            raise SystemExit(f"nothing was committed: {reply.message}")
        report = reply.reports[0]
        injected = reply.version.version
        print(
            f"  version {injected}: {len(reply.version.slots)} slots written, "
            f"p(target) {report.prob_before:.3f} -> {report.prob_after:.3f}"
        )

        print("3. ask again")
        ask(stub, args.prompt)

        print("4. history")
        for version in stub.ListVersions(pb.ListVersionsRequest(limit=3)).versions:
            print(f"  {version.version:>4}  {version.kind:<8} {version.message}")
        diff = stub.Diff(pb.DiffRequest(from_version=str(injected - 1), to_version=str(injected)))
        print(f"  diff {diff.from_version}..{diff.to_version}: {len(diff.slots)} slots changed")

        print("5. roll back to the version before the injection")
        rolled = stub.Rollback(pb.RollbackRequest(target=str(injected - 1)))
        target = json.loads(rolled.version.meta_json)["target"]
        print(f"  version {rolled.version.version} restores version {target}")

        print("6. ask again")
        ask(stub, args.prompt)


if __name__ == "__main__":
    main()
