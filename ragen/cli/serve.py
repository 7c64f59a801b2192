"""``ragen serve``: hold one model and any number of indexes in a warm process behind an HTTP API."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DEFAULT_MODEL, app, err, run_command
from ._options import CompileOpt, GuardConfigOpt, GuardOpt, guard_option
from ..errors import RagenError


def parse_index_args(values: list[str]) -> dict[str, str]:
    """``NAME=DIR`` (or a bare ``DIR``, named after its folder) -> {name: dir}."""
    indexes: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep:
            directory, name = value, Path(value).expanduser().resolve().name
        if not name or not directory:
            raise RagenError(f"--index {value!r}: expected NAME=DIR or DIR")
        if name in indexes:
            raise RagenError(f"--index {value!r}: the name {name!r} is given twice")
        indexes[name] = directory
    return indexes


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder spec. Default: $RAGEN_MODEL, else the model the first --index was built with, else McGill-NLP/LLM2Vec-Gen-Qwen3-06B.")] = None,
    index: Annotated[Optional[list[str]], typer.Option("--index", "-i", help="NAME=DIR of an index to serve (repeatable); a bare DIR is named after its folder.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: pick a free one and print it).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="RAGEN_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health. Default: $RAGEN_API_KEY.")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Model id clients send and /v1/models lists (default: the spec).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: GPU when available).")] = None,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Local backbone directory for an LLM2Vec-Gen checkpoint.")] = None,
    max_batch_tokens: Annotated[int, typer.Option(min=1, help="Token budget of one forward batch (batch size x longest input).")] = 16384,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward batch at most.")] = 64,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long the first waiting request may wait for others to batch with.")] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting for the model before new ones get 429.")] = 256,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body (413 beyond).")] = 4 * 1024 * 1024,
    max_inputs: Annotated[int, typer.Option(min=1, help="Texts per request at most.")] = 2048,
    max_input_tokens: Annotated[int, typer.Option(min=1, help="Tokens per text at most (400 beyond); longer than the model's input length is truncated as `ragen encode` does.")] = 8192,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Return unit-length vectors unless a request says otherwise (OpenAI's convention).")] = True,
    llm: Annotated[Optional[str], typer.Option("--llm", help="Local causal LM directory (with a chat template) that answers /v1/chat/completions; default: the LLM2Vec-Gen model's own backbone (baseline encoders have none).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens one chat answer or decode may generate (400 beyond).")] = 512,
    chat_step_tokens: Annotated[int, typer.Option(min=1, help="Tokens a chat answer decodes per turn on the model; embedding batches run between turns.")] = 8,
    guard: GuardOpt = False,
    guard_config: GuardConfigOpt = None,
    log_level: Annotated[str, typer.Option(help="uvicorn and ragen log level: debug, info, warning, error.")] = "warning",
    compile_backbone: CompileOpt = False,
) -> None:
    """Serve embeddings and chat completions (OpenAI-compatible), search, decoding and metrics over HTTP."""

    def body() -> None:
        import logging

        from ..serve import ServeConfig, check_bind

        if log_level not in ("debug", "info", "warning", "error"):
            raise RagenError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
        logging.getLogger("ragen").setLevel(log_level.upper())
        check_bind(host, api_key)  # before anything slow
        config = ServeConfig(api_key=api_key, model_name=model_name, normalize=normalize,
                             max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                             max_wait_ms=max_wait_ms, max_queue=max_queue, max_body_bytes=max_body_bytes,
                             max_inputs=max_inputs, max_input_tokens=max_input_tokens, max_new_tokens=max_new_tokens,
                             chat_step_tokens=chat_step_tokens)
        if guard_config and not Path(guard_config).expanduser().is_file():
            raise RagenError(f"--guard-config {guard_config}: no such file; expected a guard JSON file")
        if llm is not None and not Path(llm).expanduser().is_dir():
            raise RagenError(f"--llm {llm}: no such directory; expected a local causal LM (config.json, weights, "
                             "tokenizer with a chat template)")
        indexes = parse_index_args(index or [])
        from ..store import read_manifest

        manifests = {name: read_manifest(directory) for name, directory in indexes.items()}  # fail before loading
        spec, base = model, base_model
        if spec is None:
            spec = os.environ.get("RAGEN_MODEL")
        if spec is None and indexes:
            recorded = next(iter(manifests.values()))["encoder"]
            spec, base = str(recorded["spec"]), base or recorded.get("base_model")
        spec = spec or DEFAULT_MODEL
        if spec.startswith(("http://", "https://")):
            raise RagenError(f"--model {spec}: ragen serve needs a model to load, not another server's URL")

        from ..serve.runner import bind_socket, run_server, url_of

        sock = bind_socket(host, port)  # a taken port fails now, not after the model has loaded
        try:
            from ..encoders import load_encoder
            from ..serve.app import create_app

            with err.status(f"loading model [bold]{spec}[/] ...", spinner="dots"):
                encoder = load_encoder(spec, device=device, base_model=base, compile=compile_backbone)
            generator = None
            if llm is not None:
                from ..rag import ChatGenerator

                with err.status(f"loading the chat model [bold]{llm}[/] ...", spinner="dots"):
                    generator = ChatGenerator.from_pretrained(llm, device=device)
            application = create_app(encoder, indexes=indexes, config=config, device=device, generator=generator,
                                     guard=guard_option(guard, guard_config))
            served = ", ".join(f"{n}={d}" for n, d in indexes.items()) or "none"
            auth = "API key required" if api_key else "no API key"
            st = application.state.ragen
            chat = (f"chat by {st.generator.source}" if st.generator is not None else "no chat (pass --llm DIR)")
            auth = f"{chat}; {'refusal guard on' if st.guards else 'no guard'}; {auth}"
            err.print(f"ragen serve: listening on {url_of(sock)} (model {application.state.ragen.model_id}, dim "
                      f"{encoder.dim}; indexes: {served}; {auth}); Ctrl-C or SIGTERM stops it", highlight=False)
            run_server(application, sock, log_level=log_level)
        finally:
            sock.close()
        err.print("ragen serve: stopped", highlight=False)

    run_command(body)
