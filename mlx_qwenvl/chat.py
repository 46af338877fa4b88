"""Multi-turn conversations that keep the KV cache: each turn prefills only its new tokens,
so images of earlier turns are never processed or encoded again."""

from typing import Iterator, List, Optional

from .generate import (GenerationResponse, collect_verbose, generation_options, make_cache, media_list,
                       stream_tokens)

# Stands in for the last answer while rendering, to cut the template's text after it.
_ANSWER = "\x00answer\x00"


class ChatSession:
    def __init__(self, model, processor, system: Optional[str] = None,
                 max_kv_size: Optional[int] = None, min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None, video_fps: Optional[float] = None,
                 video_max_frames: Optional[int] = None):
        self.model = model
        self.processor = processor
        self.system = system
        self.max_kv_size = max_kv_size
        self.media_options = {"min_pixels": min_pixels, "max_pixels": max_pixels,
                              "video_fps": video_fps, "video_max_frames": video_max_frames}
        self.clear()

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = make_cache(self.model, self.max_kv_size)
        self.tokens: List[int] = []  # exactly the ids held in the cache
        self.last_prefill_tokens = 0

    def stream(self, text: str, images=(), videos=(), *, image=None, video=None,
               **generation_kwargs) -> Iterator[GenerationResponse]:
        """Ask ``text`` about new ``images``/``videos`` and stream the answer.

        Media are sources (paths, URLs, PIL images), one or a list; mlx-vlm's ``image=`` and
        ``video=`` are accepted too; their pixel and frame options are the session's
        (``min_pixels``/``max_pixels`` in pixels of area, ``video_fps`` in frames per second,
        ``video_max_frames``: see ``Processor.__call__``). Options are ``stream_tokens``' (see
        ``stream_generate``; ``temp`` for temperature too). Only this turn's tokens are
        prefilled: earlier turns, their images included, come from the session's cache.

        Yields ``GenerationResponse``s as ``stream_generate`` does, with ``prompt_tokens`` this
        turn's new tokens and ``cached_tokens`` those the cache already held.

        Stopping early (closing the iterator, Ctrl-C) keeps the session consistent: the
        partial answer stays in the conversation; an interruption before the answer began
        undoes the turn.

        Raises:
            InputError: unusable media or prompt (one that, with the conversation, does not
                fit the model's context too), or an option out of range.
            TypeError: an unknown option.
            ValueError: an interruption (during the prefill, or inside a forward pass) left
                tokens to undo in a rotating cache (``max_kv_size``) that has filled, which
                mlx-lm's ``RotatingKVCache`` cannot trim.
        """
        images = media_list(images or None, image, "images", "image") or []
        videos = media_list(videos or None, video, "videos", "video") or []
        generation_kwargs = generation_options(generation_kwargs, "stream")
        content = [{"type": "image", "image": item} for item in images]
        content += [{"type": "video", "video": item} for item in videos]
        content.append({"type": "text", "text": text})
        user = {"role": "user", "content": content}
        inputs = self.processor.encode(self._new_text(user), images=images, videos=videos,
                                       **self.media_options)
        new_ids = [int(i) for i in inputs["input_ids"].reshape(-1)]
        self.last_prefill_tokens = len(new_ids)
        answer_ids, answer = [], ""
        try:
            for response in stream_tokens(self.model, self.processor, inputs, self.cache,
                                          history=self.tokens, **generation_kwargs):
                answer_ids.append(response.token)
                answer += response.text
                yield response
        finally:
            self._commit(user, new_ids, answer_ids, answer)

    def send(self, text: str, images=(), videos=(), *, verbose: bool = False, **generation_kwargs):
        """The whole answer as a ``GenerationResult`` (arguments and errors as ``stream``; its
        figures as ``generate``'s, with ``cached_tokens`` the tokens earlier turns left in the
        cache); ``verbose`` prints it as mlx-lm's ``generate(verbose=True)`` does.

        Raises:
            InputError: as ``stream``; also when no token was generated (max_tokens 0).
        """
        return collect_verbose(self.stream(text, images, videos, **generation_kwargs), verbose)

    def _new_text(self, user: dict) -> str:
        """The template text that the cache does not hold yet."""
        if not self.tokens:
            return self.processor.apply_chat_template(self.messages + [user])
        history = self.messages[:-1] + [{"role": "assistant", "content": _ANSWER}]
        rendered = self.processor.apply_chat_template(history + [user])
        tail = rendered[rendered.rindex(_ANSWER) + len(_ANSWER):]
        # The cache already holds <|im_end|> when the model ended its answer with it.
        end = "<|im_end|>"
        last = self.processor.tokenizer.convert_ids_to_tokens(self.tokens[-1])
        return tail[len(end):] if last == end and tail.startswith(end) else tail

    def _commit(self, user, new_ids, answer_ids, answer) -> None:
        held = self.cache.offset
        prompt_end = len(self.tokens) + len(new_ids)
        complete = held >= prompt_end  # an interruption during prefill undoes the turn
        keep = min(held, prompt_end + len(answer_ids)) if complete else len(self.tokens)
        # An interruption can also stop between layers: make every layer hold the same tokens
        # (and, for an undone turn, restore the M-RoPE offset from before its images).
        self.cache.trim(keep)
        if not complete:
            return
        self.tokens = (self.tokens + new_ids + answer_ids)[:keep]
        self.messages += [user, {"role": "assistant", "content": answer}]
