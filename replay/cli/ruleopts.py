"""The rule flags shared by ``filter``, ``play`` and ``capture``, made from ``replay.rules.options``.

``rule_options(exclude=...)`` adds one click option per rule (and ``--rules FILE``) to a command;
``rules_from_kwargs(kwargs)`` takes their values back out of the command's keyword arguments and
builds ``replay.rules.ruleset.Rules`` (or returns None when no rule was given).
"""

from __future__ import annotations

import click

from replay.rules.options import FLAG, INT, OPTIONS, Setting


def _param(key: str) -> str:
    return "rule_" + key.replace("-", "_")


def rule_options(exclude=()):
    def deco(f):
        for opt in reversed(OPTIONS):
            if opt.key in exclude:
                continue
            decl = f"--{opt.key}"
            if opt.kind == FLAG:
                f = click.option(decl, _param(opt.key), is_flag=True, default=None,
                                 help=opt.help)(f)
            else:
                f = click.option(decl, _param(opt.key), multiple=opt.multiple, metavar=opt.metavar,
                                 type=int if opt.kind == INT else str, help=opt.help)(f)
        return click.option("--rules", "rule_file", metavar="FILE.toml",
                            type=click.Path(dir_okay=False),
                            help="Rules from a TOML file (keys are these flags' names); flags "
                                 "given beside it add to it.")(f)
    return deco


def rule_input_files(kwargs: dict) -> dict:
    """The files the rule options read (``--rules``, ``--plugin FILE.py:FUNCTION``), label ->
    path, so that no output overwrites them (``replay.outputs``). Leaves ``kwargs`` as it is."""
    files = {}
    if kwargs.get("rule_file"):
        files["the rules file"] = kwargs["rule_file"]
    for spec in kwargs.get(_param("plugin")) or ():
        path = str(spec).rpartition(":")[0]
        if path.endswith(".py"):
            files[f"the plugin {path}"] = path
    return files


def rules_from_kwargs(kwargs: dict):
    """Pop the rule options out of ``kwargs``; the ``Rules`` they make, or None."""
    from replay.rules import rulesfile
    from replay.rules.ruleset import Rules

    path = kwargs.pop("rule_file", None)
    flags = []
    for opt in OPTIONS:
        name = _param(opt.key)
        if name not in kwargs:
            continue
        value = kwargs.pop(name)
        if value is None or value == () or value is False:
            continue
        for v in (value if opt.multiple else [value]):
            flags.append(Setting(opt.key, v))
    settings = rulesfile.merge(rulesfile.load(path), flags) if path else flags
    if not settings:
        return None
    rules = Rules(settings)
    return None if rules.empty else rules
