"""Chat templates of real model families render exactly as transformers renders them, and
tokenizer directories written by transformers load in orchard with the same ids.

A tiny orchard-trained tokenizer carries each template (Qwen2.5's ChatML with tools, a Llama 3.1
style template with bos_token, header tokens and strftime_now, a Mistral style template that calls
raise_exception, a Qwen3 style thinking template); it is loaded both by orchard and by
`transformers.AutoTokenizer`, with the template in tokenizer_config.json and in chat_template.jinja.
"""

import json

import pytest

from orchard.errors import OrchardError
from orchard.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is needed to compare with its rendering")

# Qwen2.5-Instruct's chat template (tokenizer_config.json), with its tools and default system prompt.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Llama 3.1 style: bos_token, header tokens, a system block with a date from strftime_now unless
# date_string is passed.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Mistral style: roles must alternate, else raise_exception.
MISTRAL_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {{- '[INST] ' + message['content'] + ' [/INST]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# Qwen3 style: reasoning_content (transformers aliases `thinking` to it) and enable_thinking.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'assistant' and message.reasoning_content is defined %}\n"
    "        {{- '<|im_start|>assistant\\n<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' "
    "+ message.content + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the weather like in Paris today?",
    "It is sunny and 22 degrees in Paris.",
    "今天天气很好，我们去公园散步吧。",
    "果园里整齐地种着苹果树、梨树和樱桃树。",
]

SYSTEM_MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hi! 你好"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "  What is 2+2?  "},
]
USER_ONLY = [{"role": "user", "content": "Tell me about orchards."}]
ALTERNATING = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather <in> a city & \"quotes\"",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CALLS = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris and 北京?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
    ]},
    {"role": "tool", "content": "22 degrees"},
    {"role": "tool", "content": "18 degrees"},
    {"role": "assistant", "content": "Sunny in both."},
]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    tokenizer = Tokenizer.train(iter(CORPUS * 20), vocab_size=400)
    tokenizer._backend.add_special_tokens(LLAMA3_TOKENS)
    return tokenizer


def save_with_template(tokenizer: Tokenizer, directory, template, form: str):
    """Save `tokenizer` with `template` in tokenizer_config.json ("config") or chat_template.jinja ("jinja")."""
    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        tokenizer.save(directory)
    finally:
        tokenizer.chat_template = saved
    if form == "jinja":
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        del config["chat_template"]
        config_file.write_text(json.dumps(config))
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    return directory


def load_both(directory):
    return Tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(str(directory))


def assert_same_rendering(ours, theirs, messages, **kwargs):
    for add_generation_prompt in (False, True):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                              **kwargs)
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        assert got == expected
    return got


@pytest.mark.parametrize("form", ["config", "jinja"])
def test_qwen25_template_matches_transformers(trained, tmp_path, form):
    ours, theirs = load_both(save_with_template(trained, tmp_path, QWEN25_TEMPLATE, form))
    assert ours.chat_template == QWEN25_TEMPLATE
    for messages in (SYSTEM_MULTI_TURN, USER_ONLY, TOOL_CALLS):
        assert_same_rendering(ours, theirs, messages)
    rendered = assert_same_rendering(ours, theirs, TOOL_CALLS, tools=[WEATHER_TOOL])
    assert '"description": "Current weather <in> a city & \\"quotes\\""' in rendered  # tojson does not escape HTML
    assert "北京" in rendered  # ensure_ascii=False
    # The rendered chat tokenizes the same way (special tokens in the text become their ids).
    assert ours.encode(rendered) == theirs.apply_chat_template(TOOL_CALLS, tools=[WEATHER_TOOL],
                                                               add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("form", ["config", "jinja"])
def test_llama3_template_matches_transformers(trained, tmp_path, form):
    ours, theirs = load_both(save_with_template(trained, tmp_path, LLAMA3_TEMPLATE, form))
    for messages in (SYSTEM_MULTI_TURN, USER_ONLY):
        rendered = assert_same_rendering(ours, theirs, messages, date_string="26 Jul 2024")
        assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
        assert "Today Date: 26 Jul 2024" in rendered
        assert ours.encode(rendered)[:2] == [ours.bos_id, ours.token_to_id("<|start_header_id|>")]
    # Without date_string the template calls strftime_now.
    assert_same_rendering(ours, theirs, USER_ONLY)


@pytest.mark.parametrize("form", ["config", "jinja"])
def test_raise_exception_template(trained, tmp_path, form):
    ours, theirs = load_both(save_with_template(trained, tmp_path, MISTRAL_TEMPLATE, form))
    rendered = assert_same_rendering(ours, theirs, ALTERNATING)
    assert rendered == "<|begin_of_text|>[INST] Hi [/INST] Hello.<|end_of_text|>[INST] Bye [/INST]"
    for bad in (SYSTEM_MULTI_TURN, ALTERNATING[1:]):
        with pytest.raises(OrchardError, match="chat template: Conversation roles must alternate") as excinfo:
            ours.apply_chat_template(bad)
        assert "\n" not in str(excinfo.value)
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            theirs.apply_chat_template(bad, tokenize=False)


def test_thinking_template_extra_kwargs_and_reasoning_alias(trained, tmp_path):
    ours, theirs = load_both(save_with_template(trained, tmp_path, QWEN3_TEMPLATE, "config"))
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "thinking": "Two and two."},
                {"role": "user", "content": "3+3?"}]
    rendered = assert_same_rendering(ours, theirs, messages, enable_thinking=False)
    assert "<think>\nTwo and two.\n</think>" in rendered and rendered.endswith("<think>\n\n</think>\n\n")
    assert_same_rendering(ours, theirs, messages)


def test_named_templates_pick_default_and_tool_use(trained, tmp_path):
    trained.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": MISTRAL_TEMPLATE},
                               {"name": "tool_use", "template": QWEN25_TEMPLATE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_both(tmp_path)
    assert ours.chat_template == MISTRAL_TEMPLATE
    assert_same_rendering(ours, theirs, ALTERNATING)
    assert_same_rendering(ours, theirs, TOOL_CALLS, tools=[WEATHER_TOOL])
    # Saved by orchard, the named templates survive, and transformers still agrees.
    ours.save(tmp_path / "again")
    again, theirs_again = load_both(tmp_path / "again")
    assert again.chat_templates == {"default": MISTRAL_TEMPLATE, "tool_use": QWEN25_TEMPLATE}
    assert_same_rendering(again, theirs_again, TOOL_CALLS, tools=[WEATHER_TOOL])


def test_directory_saved_by_transformers(trained, tmp_path):
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(trained._backend.to_str())
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>",
                                              chat_template=QWEN25_TEMPLATE)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()  # where transformers 5 keeps the template
    ours, theirs = load_both(tmp_path)
    assert ours.bos_token is None and ours.bos_id is None and theirs.bos_token_id is None
    assert ours.eos_id == theirs.eos_token_id == trained.token_to_id("<|im_end|>")
    assert theirs.pad_token is None and ours.pad_id == ours.eos_id  # no pad token: falls back to eos
    assert not ours.adds_bos_by_default
    assert ours.vocab_size == len(theirs)
    for text in CORPUS + ["Unseen words: zebra 斑马 🍎 42", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False) == theirs.encode(text)
    assert ours.encode("hi", add_bos=True) == ours.encode("hi")  # no BOS to add
    for messages in (SYSTEM_MULTI_TURN, TOOL_CALLS):
        assert_same_rendering(ours, theirs, messages)


def test_bos_adding_post_processor(trained, tmp_path):
    """Llama-style tokenizer.json: a TemplateProcessing post-processor adds BOS in transformers."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    backend = Backend.from_str(trained._backend.to_str())
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    Tokenizer(backend).save(tmp_path)
    ours, theirs = load_both(tmp_path)
    assert ours.adds_bos_by_default and not trained.adds_bos_by_default
    for text in CORPUS:
        assert theirs.encode(text) == ours.encode(text, add_bos=True) == [ours.bos_id, *ours.encode(text)]
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)


def test_environment_globals_match(trained, tmp_path):
    """namespace, dict, loop controls, {% generation %}, tojson options: same output as transformers."""
    template = (
        "{%- set ns = namespace(count=0) %}"
        "{%- for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{%- set ns.count = ns.count + 1 %}"
        "{% generation %}{{ m.content }}{% endgeneration %}|{% endfor %}"
        "{{ ns.count }} {{ dict(a=1) | tojson(indent=2, sort_keys=true) }} {{ messages[0] | tojson }}"
        "\n    {% if add_generation_prompt %}\n{{ eos_token }}\n    {% endif %}\nend"  # trim/lstrip_blocks
    )
    ours, theirs = load_both(save_with_template(trained, tmp_path, template, "config"))
    assert_same_rendering(ours, theirs, SYSTEM_MULTI_TURN)
    bad = "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}"
    with pytest.raises(OrchardError, match="underscore"):
        ours.apply_chat_template(USER_ONLY, chat_template=bad)


def test_special_tokens_map_file_and_dict_tokens(trained, tmp_path):
    """A legacy directory (no added_tokens_decoder) whose special_tokens_map.json holds AddedToken dicts."""
    trained.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"], config["pad_token"]
    config["chat_template"] = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    added = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin_of_text|>", **added},
        "eos_token": {"content": "<|im_end|>", **added},
        "unk_token": "<|pad|>",
    }))
    ours, theirs = load_both(tmp_path)
    assert ours.eos_id == theirs.eos_token_id == trained.token_to_id("<|im_end|>")
    assert ours.bos_id == theirs.bos_token_id == 0
    assert ours.pad_id == ours.eos_id
    rendered = assert_same_rendering(ours, theirs, USER_ONLY)
    assert rendered == "<|begin_of_text|>|<|im_end|>||<|pad|>"
