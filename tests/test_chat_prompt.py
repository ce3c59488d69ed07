"""Chat prompts: a tokenizer with a chat template gives exactly the template's ids
(transformers 5 hands back a BatchEncoding, not a list or dict, from
``apply_chat_template(tokenize=True)``); one without falls back to role lines."""
from __future__ import annotations

from collections.abc import Mapping

import transformers

from checkpoints import real_model_dir
from m2cache.worker.runtime import chat_prompt_ids

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


def _tokenizer():
    return transformers.AutoTokenizer.from_pretrained(real_model_dir("tinystories-656k"), local_files_only=True)


def test_template_ids_equal_transformers_own_tokenisation():
    tok = _tokenizer()
    tok.chat_template = TEMPLATE
    ids = chat_prompt_ids(tok, MESSAGES)
    direct = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    direct = direct["input_ids"] if isinstance(direct, Mapping) else direct
    assert ids == list(direct)
    assert all(isinstance(i, int) for i in ids) and len(ids) > 10
    assert tok.decode(ids).endswith("<|assistant|>")


def test_no_template_uses_role_lines():
    tok = _tokenizer()
    tok.chat_template = None
    ids = chat_prompt_ids(tok, MESSAGES)
    assert ids == tok.encode("system: Be brief.\nuser: Tell me a story.\nassistant:")
