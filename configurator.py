"""
Poor man's configurator, nanoGPT style. A script defines its defaults as module globals, then runs
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
and this code, executed in the script's own globals, applies the command line in order:
    python train_cb.py config/organism.py --layers=2,4 --lr=3e-4
A bare argument is a Python config file that assigns some of the globals; `--key=value` overrides
one, its value parsed with ast.literal_eval (a bare word stays a string). An unknown key or a value of
the wrong type stops the script with one line. Afterwards `config` holds every setting by name.
"""


def _configure(g, argv):
    import ast
    import builtins  # the script may shadow a builtin with a setting (train_cb.py has `compile`)
    import sys

    types = (int, float, bool, str, tuple, list, dict, type(None))
    keys = [k for k, v in g.items() if not k.startswith("_") and isinstance(v, types) and k != "config"]

    def fail(msg):
        sys.exit(f"config error: {msg}")

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

    for arg in argv:
        if not arg.startswith("--"):
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
                if key.startswith("_") or not isinstance(value, types):
                    continue  # imports and helpers of the config file
                if key not in keys:
                    fail(f"{arg}: unknown config key {key!r}")
                g[key] = coerce(key, value, arg)
            continue
        if "=" not in arg:
            fail(f"{arg}: expected --key=value")
        key, raw = arg[2:].split("=", 1)
        if key not in keys:
            fail(f"{arg}: unknown config key {key!r}")
        try:
            value = raw if isinstance(g[key], str) else ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw  # a bare word stays a string
        g[key] = coerce(key, value, f"--{key}")
    g["config"] = {k: g[k] for k in keys}


_configure(globals(), __import__("sys").argv[1:])
del _configure
