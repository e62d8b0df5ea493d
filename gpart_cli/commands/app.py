"""The `gpart` command line (docs/design.md §5): one module per command, registered here.

Exit codes: 0 ok, 2 user error (a `GpartError`: the message names the field or file and the fix), 1 internal error.
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import convert, evaluate, inspect_adapter, merge, push, sweep_d, train

# rich_markup_mode None: help texts are plain text, so pip install 'gpart[vllm]' is not read as Rich markup (which
# printed 'gpart').
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Fine-tune Hugging Face models with GPart: one vector theta, partitioned over all weights.")


def _print_version(value: bool) -> None:
    if value:
        from ..versions import __version__

        typer.echo(f"gpart {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print gpart's version and exit.")] = False) -> None:
    """Options before the command."""


app.command(name="inspect")(inspect_adapter.inspect)
app.command()(merge.merge)
app.command()(convert.convert)
app.command()(train.train)
app.command(name="eval")(evaluate.evaluate)
app.command()(push.push)
app.command(name="sweep-d")(sweep_d.sweep_d)

def main() -> None:
    import logging
    import os

    # Library tqdm bars (GGUF dequantizing, datasets casting, shards) would garble the Rich progress display.
    # tqdm reads TQDM_DISABLE when it is imported, which happens before this runs, so switch its default too.
    os.environ.setdefault("TQDM_DISABLE", "1")
    if os.environ["TQDM_DISABLE"] == "1":
        from functools import partialmethod

        import tqdm

        tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)
    import transformers

    transformers.logging.set_verbosity_error()  # load reports and bars would drown the progress display
    transformers.logging.disable_progress_bar()
    # bitsandbytes (imported by peft whenever it is installed) warns at import, on CPUs with AVX512-BF16, that an
    # optional kernels package is missing: noise for every run that does not quantize, and not needed by those that do.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    app()
