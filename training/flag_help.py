"""
Help text for train.py's flags from the comments beside Config's fields: the comments are the one source.

    help = flag_help(Config, choices=CHOICES, presets=PRESETS)    # {field name: "meaning (choices; default)"}

A field's comment is the `#` comment on its line plus any comment-only lines right below it (the continuation).
"""

import dataclasses
import inspect
import io
import tokenize


def field_comments(cls) -> dict[str, str]:
    """{field: its comment} of a dataclass, read from its source with tokenize (a '#' in a string is no comment)."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments, current, line_of_field = {}, None, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        at_field = tok.type == tokenize.NAME and tok.start[1] == 4 and tok.line.strip().startswith(tok.string + ":")
        if at_field and tok.string in names:
            current, line_of_field = tok.string, tok.start[0]
            comments[current] = ""
        elif tok.type == tokenize.COMMENT and current is not None:
            own_line = tok.line.strip().startswith("#")
            if tok.start[0] == line_of_field or (own_line and comments[current]):
                comments[current] = (comments[current] + " " + tok.string.lstrip("#").strip()).strip()
        elif tok.type == tokenize.NAME and tok.start[1] == 4:
            current = None
    return comments


def flag_help(cls, choices: dict, presets: dict) -> dict[str, str]:
    """Each field's comment, then its choices and its default (and where a preset changes that default)."""
    def shown(v):
        return ("on" if v else "off") if isinstance(v, bool) else repr(v) if v == "" else v

    out = {}
    for f, text in field_comments(cls).items():
        extra = [f"choices: {' | '.join(choices[f])}"] if f in choices else []
        if not (getattr(cls, f) == "" and "default" in text):  # the comment already says what "" means
            extra.append(f"default: {shown(getattr(cls, f))}")
        extra += [f"{p} preset: {shown(v[f])}" for p, v in presets.items() if f in v]
        out[f] = (f"{text} ({'; '.join(extra)})" if extra else text).replace("%", "%%")
    return out
