"""Generated token ids to text, as they come: end-of-sequence, stop strings and streaming deltas."""

from collections.abc import Callable, Iterable

_PARTIAL = "\ufffd"  # what decoding shows for the first bytes of a character split across tokens


class TextTracker:
    """Follows one generation token by token (it is a transformers streamer).

    The text never includes the end-of-sequence token nor a stop string, nor what follows one.
    `on_text` gets each new piece of text once it is certain: a tail that could be the start of
    a stop string, or half a UTF-8 character, is held back until the next token settles it.
    """

    def __init__(
        self,
        tokenizer,
        stop: Iterable[str] = (),
        eos_ids: Iterable[int] = (),
        on_text: Callable[[str], None] | None = None,
    ):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.eos_ids = set(eos_ids)
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" once EOS or a stop string was generated
        self._sent = 0
        self._prompt_seen = False

    # transformers' streamer protocol: the prompt first, then each new token
    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.add(int(token))

    def end(self) -> None:
        self._emit(len(self.text))

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        if self.done:
            return
        self.token_ids.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            self._emit(len(self.text))
            return
        previous = len(self.text)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._find_stop(text, previous)
        if cut is not None:
            self.text = text[:cut]
            self.finish_reason = "stop"
            self._emit(cut)
            return
        self.text = text
        self._emit(len(text) - self._held_back(text))

    def _find_stop(self, text: str, previous: int) -> int | None:
        if not self.stop:
            return None
        start = max(0, previous - max(map(len, self.stop)))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        partial = len(text) - len(text.rstrip(_PARTIAL))
        if partial:
            return partial
        for size in range(min(len(text), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stop):
                return size
        return 0

    def _emit(self, upto: int) -> None:
        if upto > self._sent:
            piece, self._sent = self.text[self._sent : upto], upto
            if self.on_text is not None:
                self.on_text(piece)
