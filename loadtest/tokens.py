"""Token counting for prompt construction: the server's own `/tokenize` and `/detokenize`, or a local
Hugging Face tokenizer directory. Prompts are sized by the tokenizer that will serve them."""

from __future__ import annotations

from typing import Protocol

import httpx


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def pieces(self, text: str) -> tuple[list[int], list[str]]: ...  # ids and their token strings
    def decode(self, ids: list[int]) -> str: ...
    def count_chat(self, messages: list[dict]) -> int: ...


class ServerTokenizer:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=120)
        self.model = model

    def _post(self, path: str, body: dict) -> dict:
        r = self.client.post(path, json={"model": self.model, **body})
        r.raise_for_status()
        return r.json()

    def encode(self, text: str) -> list[int]:
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]

    def pieces(self, text: str) -> tuple[list[int], list[str]]:
        body = self._post("/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True})
        return body["tokens"], body["token_strs"]

    def decode(self, ids: list[int]) -> str:
        return self._post("/detokenize", {"tokens": ids})["prompt"]

    def count_chat(self, messages: list[dict]) -> int:
        return self._post("/tokenize", {"messages": messages, "add_generation_prompt": True})["count"]


class LocalTokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def pieces(self, text: str) -> tuple[list[int], list[str]]:
        ids = self.encode(text)
        return ids, self.tok.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def count_chat(self, messages: list[dict]) -> int:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tok.encode(text, add_special_tokens=False))
