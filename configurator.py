"""
Poor man's configurator, nanoGPT style. A script assigns its settings as module globals between two marker
lines (`# ---...`), then, at the end of them, runs
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
and this code, executed in the script's own globals, applies the command line in order:
    python train_cb.py config/organism.py --layers=2,4 --lr=3e-4 --compile
    python eval.py out/ckpt.pt --n_cases=50        # a script that sets _positional = "ckpt" before the exec
The settings are the names assigned between the script's first two marker lines, nothing else (an imported
constant is not one). A bare argument ending in .py is a config file that assigns some of them; the one other
bare argument a script with `_positional` takes sets that setting. `--key=value` sets one, its value parsed
with ast.literal_eval (a bare word stays a string); a bare `--key` of a bool setting means True. A script that
runs others declares them, `_forward = ("train_cb.py", "eval.py")`, and a `--key` of theirs goes as it is into
`forward[script]` of each that has it. Any other argument, an unknown key or a value of the wrong type stops
the script with one line. Afterwards `config` holds every setting by name.
"""


def _configure(g, argv):
    import ast
    import builtins  # the script may shadow a builtin with a setting (train_cb.py has `compile`)
    import os
    import re

    from util import fail

    def settings(path):
        """Names assigned at module level between the first two `# ---` lines of the script at `path`."""
        with open(path) as f:
            src = f.read()
        marks = [i + 1 for i, line in enumerate(src.splitlines()) if re.fullmatch(r"# -{3,}\s*", line)]
        if len(marks) < 2:
            fail(f"{path}: no settings block (two '# ---' lines around the settings) for configurator.py")
        names = []
        for stmt in ast.parse(src, path).body:
            if not marks[0] < stmt.lineno < marks[1]:
                continue
            for node in ast.walk(stmt):
                if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        names += [n.id for n in ast.walk(target)
                                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        return [k for k in dict.fromkeys(names) if not k.startswith("_") and k != "config"]

    def coerce(key, value, where):
        default = g[key]
        if default is None or value is None or type(value) is type(default):
            return value
        if isinstance(default, float) and type(value) is int:
            return float(value)
        if isinstance(default, tuple) and isinstance(value, (int, float, str, list)):
            return tuple(value) if isinstance(value, list) else (value,)
        if isinstance(default, list) and isinstance(value, tuple):
            return list(value)
        fail(f"{where}: {key} expects {type(default).__name__} (default {default!r}), got {value!r}")

    if "__file__" not in g:
        fail("configurator.py reads the settings from the running script's file, and this one has no __file__")
    keys = [k for k in settings(g["__file__"]) if k in g]
    positional, seen = g.get("_positional"), None
    here = os.path.dirname(os.path.abspath(g["__file__"]))
    others = {script: settings(os.path.join(here, script)) for script in g.get("_forward", ())}
    forward = {script: [] for script in others}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if key not in keys and any(key in k for k in others.values()):
                for script in others:
                    if key in others[script]:
                        forward[script].append(arg)
                continue
            if key not in keys:
                fail(f"{arg}: unknown config key {key!r}")
            if not eq and not isinstance(g[key], bool):
                fail(f"{arg}: expected --{key}=VALUE ({key} is not a bool)")
            try:
                value = True if not eq else raw if isinstance(g[key], str) else ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # a bare word stays a string
            g[key] = coerce(key, value, f"--{key}")
        elif arg.endswith(".py"):
            try:
                src = open(arg).read()
            except OSError as e:
                fail(f"{arg}: cannot read config file ({e.strerror})")
            scope = {}
            try:
                exec(builtins.compile(src, arg, "exec"), scope)
            except Exception as e:
                fail(f"{arg}: {type(e).__name__}: {e}")
            for key, value in scope.items():
                if key.startswith("_") or not isinstance(value, (int, float, str, tuple, list, dict, type(None))) \
                        and (key not in keys or callable(value) or isinstance(value, type(os))):
                    continue  # imports and helpers of the config file (a set or a range for a setting is no helper)
                if key not in keys:
                    fail(f"{arg}: unknown config key {key!r}")
                g[key] = coerce(key, value, arg)
        elif positional:
            if seen is not None:
                fail(f"one {positional} at a time, got {seen} and {arg}")
            seen = g[positional] = arg
        else:
            fail(f"{arg}: not a config file (*.py) or --key=value, and {os.path.basename(g['__file__'])} "
                 f"takes no positional argument")
    g["config"] = {k: g[k] for k in keys}
    if others:
        g["forward"] = forward


_configure(globals(), __import__("sys").argv[1:])
del _configure
