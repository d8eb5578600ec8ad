"""Commands built from typed functions: the parser comes from the signature and docstring (jsonargparse).

Every option is then typed and documented, and any command reads its options from a YAML file with
`--config`, as `cirlab fit` does (the LitGPT pattern). Used by train/ and data/ alike.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


def _params_of_type(fn: Callable[..., Any], kind: type) -> set[str]:
    """Parameters typed as `kind` (list: list[str], Optional[list[...]]; bool: bool, Optional[bool])."""
    import typing

    out = set()
    for name, hint in typing.get_type_hints(fn).items():
        hints = [hint, *typing.get_args(hint)]
        if any(h is kind or typing.get_origin(h) is kind for h in hints):
            out.add(name)
    return out


def _shell_style(argv: Sequence[str], lists: set[str], flags: set[str] = frozenset()) -> list[str]:
    """`--batch-size 8` -> `--batch_size 8`, `--sets a b` -> `--sets ["a", "b"]` and a bare `--strict`
    -> `--strict true`: the way shell users write options, not only jsonargparse's."""
    import json

    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            name = name.replace("-", "_")
            if name in lists and not eq:
                values = []
                while i + 1 < len(args) and not args[i + 1].startswith("--"):
                    values.append(args[i + 1])
                    i += 1
                if len(values) == 1 and values[0].startswith("["):
                    out += [f"--{name}", values[0]]
                else:
                    out += [f"--{name}", json.dumps(values)]
            elif name in flags and not eq and (i + 1 == len(args) or args[i + 1].startswith("--")):
                out += [f"--{name}", "true"]
            else:
                out.append(f"--{name}{eq}{value}")
        else:
            out.append(a)
        i += 1
    return out


def run_function_command(fn: Callable[..., Any], argv: Sequence[str], prog: str,
                         show: Callable[[Any], None] | None = None) -> int:
    """Parse `argv` against `fn`'s signature, call it, print its result (`show`, or a report's
    `summary()`); returns the function's int result or 0."""
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser

    from cirlab.errors import CirlabError

    parser = ArgumentParser(prog=prog, description=(fn.__doc__ or "").strip().split("\n")[0], default_meta=False,
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="options from a YAML file")
    parser.add_function_arguments(fn, as_group=False)
    try:
        cfg = parser.parse_args(_shell_style(argv, _params_of_type(fn, list), _params_of_type(fn, bool)))
    except argparse.ArgumentError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise CirlabError("; ".join(lines[:2]), f"`{prog} --help` lists the options") from None
    kwargs = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    result = fn(**kwargs)
    if show is not None:
        show(result)
    elif hasattr(result, "summary"):
        print(result.summary())
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
