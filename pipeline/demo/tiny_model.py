"""Write a tiny random Llama model that the CPU build of vLLM can load and serve.

    <vllm-venv>/bin/python pipeline/demo/tiny_model.py OUT_DIR

A standalone script: it imports only the standard library, ``torch``, ``tokenizers`` and
``safetensors`` (all in the vLLM venv), never the ``pipeline`` package.

The model: Llama, vocab 1024, hidden 128, 2 layers, 4 heads of head_dim 32 (vLLM's CPU
attention wants head_dim >= 32), 2 KV heads, random bf16 weights from a fixed seed. Its
tokenizer is a byte-level BPE trained here on the small corpus below, by a plain Python
trainer with explicit tie-breaking (so no thread count or hash seed can change the merges).
The chat template is ChatML with a Hermes tools section (the Qwen 2.5 layout), so vLLM's
``--enable-auto-tool-choice --tool-call-parser hermes`` accepts tools (add
``--tool-strict-level parameter`` for forced choices to yield schema-valid calls). The output
is noise: the model exists to exercise the serving path (OpenAI chat completions, Anthropic
``/v1/messages``, tool calls), not to say anything. Two things are engineered (see
``weights``): sampled replies end with <|im_end|> after a few dozen tokens, and
whitespace-only tokens are rare, so JSON forced by a tool-call grammar comes out compact.

Deterministic: the same inputs give byte-identical files. Atomic: everything is written into
``OUT_DIR.tmp-<pid>`` and renamed into place; when ``OUT_DIR`` already holds the same files
(another run won the race) the new copy is dropped, and when it holds other files it is
replaced.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

SEED = 20240611
VOCAB_SIZE = 1024
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 32
MAX_POSITIONS = 65536  # lets a server use --max-model-len 32768 (Claude Code's floor)
ROPE_THETA = 10000.0
INIT_STD = 0.02
LOGIT_STD = 1.5  # spread of the random logits (higher: loopier text)
EOS_LOGIT_BIAS = 9.0  # <|im_end|>: sampled replies end after ~25 tokens (median)
STOP_CHANNEL = 0.02  # the constant in hidden channel 0, see weights()

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Added after the BPE vocabulary, in this order (ids VOCAB_SIZE - len .. VOCAB_SIZE - 1).
# The tool tags are plain (non-special) added tokens as in Qwen 2.5, so they survive
# skip_special_tokens and the hermes parser sees them in the text.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
BPE_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(PLAIN_ADDED_TOKENS)

CORPUS = """\
The pipeline ships vLLM into air-gapped containers. On an online build host it locks a pixi
project, downloads every package once into a cache, and packs one offline bundle: a tar file
with a channel of conda packages, a folder of Python wheels, and a small JSON file that says
what is inside. In the container, with no network at all, it extracts the bundle, checks every
hash, installs exactly the locked packages, and starts one or more OpenAI-compatible servers
described by one TOML file. The status, stop and logs tasks manage the servers afterwards.

Hello! How can I help you today? I am a small assistant. I can answer questions, write short
notes, and call tools when the user asks for something that needs them. Please tell me what you
would like to do, and I will try my best. Thank you for your question; here is the answer.
The weather today is sunny with a light wind, and the temperature is about 21 degrees. Tomorrow
it will rain in the morning and clear up in the afternoon. What is the capital of France? The
capital of France is Paris. What is two plus two? Two plus two is four. Let me think step by
step: first read the file, then count the lines, then report the number to the user.

You are a helpful assistant. You may call one or more functions to assist with the user query.
You are provided with function signatures within <tools></tools> XML tags. For each function
call, return a json object with function name and arguments within <tool_call></tool_call> XML
tags. The tool result comes back within <tool_response></tool_response> tags.
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
</tool_call>
<tool_response>
{"temperature": 21, "condition": "sunny", "wind_speed": 12}
</tool_response>
{"type": "function", "function": {"name": "read_file", "description": "Read a file from the
disk and return its text.", "parameters": {"type": "object", "properties": {"path": {"type":
"string", "description": "The path of the file to read."}, "limit": {"type": "integer"}},
"required": ["path"]}}}
{"role": "user", "content": "List the files in the current directory."}
{"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function"}]}

def main(argv: list[str]) -> int:
    for index, line in enumerate(read_lines(path)):
        if line.strip() == "":
            continue
        print(f"{index}: {line}")
    return 0

import os
import sys
from pathlib import Path

class Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.host = host
        self.port = port

    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

$ curl -s http://127.0.0.1:8000/health
$ python -m vllm.entrypoints.openai.api_server --model tiny --max-model-len 512
GET /v1/models HTTP/1.1 200 OK
POST /v1/chat/completions HTTP/1.1 200 OK
POST /v1/messages HTTP/1.1 200 OK
0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 32 64 100 128 256 512 1000 1024 2048 4096 8192 32768
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March,
April, May, June, July, August, September, October, November, December.
A quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly. Pack my box
with five dozen liquor jugs. Sphinx of black quartz, judge my vow.
Errors: file not found; permission denied; connection refused; timeout after 30 seconds;
invalid JSON in the request body; the model does not exist; unauthorized, check the API key.
"""

CHAT_TEMPLATE = """\
{%- macro content_text(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable -%}
        {%- for part in content -%}
            {%- if part is mapping and part.get('type') == 'text' -%}
                {{- part['text'] -}}
            {%- elif part is string -%}
                {{- part -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages and messages[0]['role'] == 'system' %}
        {{- content_text(messages[0]['content']) }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\
\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, \
"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + content_text(messages[0]['content']) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' and loop.first %}
    {%- elif message['role'] == 'user' or message['role'] == 'system' %}
        {{- '<|im_start|>' + message['role'] + '\\n' + content_text(message['content']) \
+ '<|im_end|>\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message['content'] %}
            {{- '\\n' + content_text(message['content']) }}
        {%- endif %}
        {%- for tool_call in message.get('tool_calls') or [] %}
            {%- if tool_call['function'] is defined %}
                {%- set tool_call = tool_call['function'] %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call['name'] + '", "arguments": ' }}
            {%- if tool_call['arguments'] is string %}
                {{- tool_call['arguments'] }}
            {%- else %}
                {{- tool_call['arguments'] | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message['role'] == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content_text(message['content']) + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the byte-level alphabet), by byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def train_bpe(corpus: str, size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE: the 256 byte symbols, then merges until ``size`` tokens.

    Each step merges the most frequent adjacent pair; ties go to the smallest pair in string
    order, so the result depends on nothing but the corpus.
    """
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts = collections.Counter(word for word, _ in pre.pre_tokenize_str(corpus))
    words = [(list(word), count) for word, count in sorted(counts.items())]
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    while len(vocab) < size:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in words:
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            raise SystemExit(f"corpus too small: {len(vocab)} tokens, wanted {size}")
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merged = best[0] + best[1]
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i : i + 2] = [merged]
                i += 1
        merges.append(best)
        # Two different pairs can spell the same string; the token keeps its first id.
        vocab.setdefault(merged, len(vocab))
    return vocab, merges


def build_tokenizer() -> Tokenizer:
    vocab, merges = train_bpe(CORPUS, BPE_SIZE)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS]
    )
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    sample = 'Hello, <|im_start|>user\n{"name": "x"}<tool_call> ünïcödé 日本<|im_end|>'
    if tokenizer.decode(tokenizer.encode(sample).ids, skip_special_tokens=False) != sample:
        raise SystemExit("tokenizer does not round-trip")
    return tokenizer


def token_id(tokenizer: Tokenizer, token: str) -> int:
    index = tokenizer.token_to_id(token)
    if index is None:
        raise SystemExit(f"token {token!r} missing")
    return index


def config_json(eot: int, im_end: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": eot,
        "eos_token_id": im_end,
        "pad_token_id": eot,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": False,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def tokenizer_config_json(tokenizer: Tokenizer) -> dict[str, object]:
    added = {
        str(token_id(tokenizer, t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": MAX_POSITIONS,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def weight_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB_SIZE, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB_SIZE, HIDDEN),
    }
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
    return shapes


def whitespace_tokens(tokenizer: Tokenizer) -> list[int]:
    """Ids of the BPE tokens that spell only whitespace (spaces, newlines, tabs)."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    return sorted(
        index
        for token, index in tokenizer.get_vocab(with_added_tokens=False).items()
        if bytes(byte_of[c] for c in token).isspace()
    )


def weights(eos: int, quiet: list[int]) -> dict[str, torch.Tensor]:
    """Random weights (each tensor from its own seed) with two engineered features.

    Hidden channel 0 carries a constant through the residual stream: every embedding has
    STOP_CHANNEL there, the layers neither read it (their input norms weigh it 0) nor write
    it (row 0 of o_proj and down_proj is 0), so after the final norm it is a steady positive
    input to the logits. Only the ``eos`` row of lm_head reads it (weight EOS_LOGIT_BIAS;
    the norm scales the channel to roughly 0.5), so <|im_end|> keeps a few percent of the
    probability at every step. Sampled replies (temperature 1) then end on their own after
    ~25 tokens (median of 40 tries; longest 108) instead of running to max_tokens, which
    matters for clients that ask for 32k tokens; greedy replies may still run to the limit.
    The same channel pushes the ``quiet`` tokens (whitespace only) down by as much: JSON
    that a grammar forces (``tool_choice`` required or named) then comes out compact rather
    than padded with whitespace until max_tokens. The other logits are random with a spread
    of about LOGIT_STD.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in sorted(weight_shapes().items()):
        if name.endswith("norm.weight"):
            values = torch.ones(shape)
            if name != "model.norm.weight":
                values[0] = 0.0
        else:
            digest = hashlib.sha256(f"{SEED}:{name}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            values = torch.randn(shape, generator=generator, dtype=torch.float32)
            if name == "lm_head.weight":
                values *= LOGIT_STD / (HIDDEN - 1) ** 0.5
                values[:, 0] = 0.0
                values[eos, 0] = EOS_LOGIT_BIAS
                values[quiet, 0] = -EOS_LOGIT_BIAS
            else:
                values *= INIT_STD
            if name == "model.embed_tokens.weight":
                values[:, 0] = STOP_CHANNEL
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                values[0, :] = 0.0
        tensors[name] = values.to(torch.bfloat16).contiguous()
    return tensors


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_model(out: Path) -> None:
    out.mkdir(parents=True)
    tokenizer = build_tokenizer()
    eot, im_end = token_id(tokenizer, ENDOFTEXT), token_id(tokenizer, IM_END)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json", tokenizer_config_json(tokenizer))
    write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": [IM_START, IM_END],
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
        },
    )
    write_json(out / "config.json", config_json(eot, im_end))
    write_json(
        out / "generation_config.json",
        {"bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot},
    )
    quiet = whitespace_tokens(tokenizer)
    save_file(weights(im_end, quiet), str(out / "model.safetensors"), metadata={"format": "pt"})
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; a server may run as another user


def same_files(a: Path, b: Path) -> bool:
    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    return digests(a) == digests(b)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0]).absolute()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_model(tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not out.is_dir():
                raise
            if same_files(tmp, out):  # another run made the same model first
                shutil.rmtree(tmp)
            else:  # stale content: swap the new model in, then drop the old one
                old = out.with_name(f"{out.name}.old-{os.getpid()}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
