"""Options and their resolution shared by ``index``, ``query``, ``ask`` and ``serve``: the refusal guard and the encoder
load options an index records (hub revisions, numerics, remote code)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def guard_option(guard: bool, guard_config: str | None):
    """The ``guard=`` argument for Retriever from ``--guard`` / ``--guard-config``."""
    if guard_config:
        return Path(guard_config)
    return True if guard else None


GuardOpt = Annotated[bool, typer.Option(
    "--guard", help="Refusal guard: a query whose embedding decodes to (or lies near) a refusal gets no documents "
                    "(threshold and prototypes from the index's guard.json, else the defaults).")]
GuardConfigOpt = Annotated[Optional[str], typer.Option(
    "--guard-config", help="Guard JSON file (written by `ragen bench guard --write-guard`); implies --guard.")]


RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Hub revision (branch, tag or commit) of the model. Default: the commit the index recorded.")]
BaseRevisionOpt = Annotated[Optional[str], typer.Option(
    "--base-revision", help="Hub revision of an LLM2Vec-Gen checkpoint's backbone. Default: as recorded.")]
NumericsOpt = Annotated[Optional[str], typer.Option(
    "--numerics", help="fp32 (heads and mean in float32) or reference (the checkpoint dtype, bit-identical to the "
                       "reference package). Default: as the index was built, else fp32.")]
TrustOpt = Annotated[Optional[bool], typer.Option(
    "--trust-remote-code/--no-trust-remote-code", help="Allow a model that ships its own Python code to run it. "
                                                       "Default: as the index was built, else off.")]

CompileOpt = Annotated[bool, typer.Option(
    "--compile", envvar="RAGEN_COMPILE",
    help="torch.compile the encoder's backbone (LLM2Vec-Gen, mean:/cls:/last:), inputs padded to length buckets: "
         "faster steady-state encoding where it pays (GPU), vectors equal to float tolerance; each new bucketed "
         "shape compiles once (inductor caches kernels in $TORCHINDUCTOR_CACHE_DIR). A speed setting, not "
         "recorded in the index. Falls back to uncompiled with a warning where unavailable. Default: "
         "$RAGEN_COMPILE, else off.")]


def encoder_options(manifest_encoder: object, *, revision: str | None = None, base_revision: str | None = None,
                    numerics: str | None = None, trust_remote_code: bool | None = None) -> tuple[dict, dict]:
    """``(load_kwargs, record)`` for the encoder an index recorded, with options given on the command line
    winning: ``load_kwargs`` go to ``load_encoder`` (the hub commits the index resolved unless a revision is
    given), ``record`` is what a build records (the revisions asked for, numerics, remote-code opt-in)."""
    from ..retriever import RecordedEncoder, recorded_load_options

    rec = RecordedEncoder.from_manifest(manifest_encoder) if manifest_encoder else None
    pinned = recorded_load_options(manifest_encoder) if manifest_encoder else {}
    record = {"revision": revision if revision is not None else (rec.revision if rec else None),
              "base_revision": base_revision if base_revision is not None else (rec.base_revision if rec else None),
              "numerics": numerics if numerics is not None else (rec.numerics if rec else None),
              "trust_remote_code": trust_remote_code if trust_remote_code is not None
              else bool(rec and rec.trust_remote_code is True)}
    load = {"revision": revision if revision is not None else pinned.get("revision"),
            "base_revision": base_revision if base_revision is not None else pinned.get("base_revision"),
            "trust_remote_code": record["trust_remote_code"]}
    if record["numerics"] is not None:
        load["numerics"] = record["numerics"]
    return load, record
