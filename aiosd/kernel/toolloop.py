"""The tool loop of ``llm.chat``: the daemon asks the model, runs the calls it makes as the
caller, feeds the results back, and repeats, up to ``max_steps`` replies; the last of them,
and the one after a call that only repeats the call before it, must be an answer
(``tool_choice: "none"``), so that the loop ends with one.

Each reply is an ordinary generation of the chat service (queued, scheduled, counted like any
other); each call goes through the tool manager's one path (:meth:`ToolManager.call`: the
caller's tools only, arguments checked, consent, the caller's own worker, audit), marked
``via=llm.chat`` in the audit log.  A call the daemon refuses (unknown tool, bad arguments,
no consent) does not end the loop: the refusal is the step's result, and the model reads it
like any other.  With ``stream: true`` every step is sent as a notification (``{"step":
{...}}``) as it happens, confirmation requests as ``{"confirm": {...}}``, and the answer's
text as the usual ``content`` pieces; the result holds the whole trace (``steps``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiosd.errors import AiosError, ContextTooLong, InvalidParams
from aiosd.kernel.families.llm import (
    ChatParams,
    ChatResult,
    ChatService,
    FunctionSpec,
    Message,
    Step,
    Timings,
    ToolSpec,
    Usage,
)
from aiosd.kernel.syscall_base import Emit
from aiosd.managers.access import Caller
from aiosd.managers.tools import Pending, ToolManager, matches
from aiosd.managers.users import UserDirectory
from aiosd.osbridge.executor import AccountRef

#: Characters of one tool result the model is given back at most (the trace keeps it all).
RESULT_CHARS = 2000

Dispatch = Callable[[str, dict[str, Any], Caller], Awaitable[dict[str, Any]]]


def for_model(step: Step) -> str:
    """A step's result as the model reads it: its output or error as JSON, cut to size."""
    body: Any = step.output if step.ok else {"error": step.error}
    text = json.dumps(body, ensure_ascii=False)
    if len(text) > RESULT_CHARS:
        text = text[:RESULT_CHARS] + f"... ({len(text) - RESULT_CHARS} more characters cut)"
    return text


class ToolLoop:
    """Runs ``llm.chat`` with ``use_tools``."""

    def __init__(
        self, chat: ChatService, tools: ToolManager, users: UserDirectory, dispatch: Dispatch
    ) -> None:
        self.chat = chat
        self.tools = tools
        self.users = users
        self._dispatch = dispatch

    async def run(self, p: ChatParams, caller: Caller, emit: Emit | None) -> ChatResult:
        """The loop: replies and calls until the model answers or ``max_steps`` replies."""
        assert p.use_tools is not None
        chosen = [t for t in await self.tools.usable(caller) if matches(t.name, p.use_tools)]
        if not chosen:
            raise InvalidParams(
                f"invalid params: use_tools: {', '.join(p.use_tools)} names no tool you may "
                "use (see tool.list)"
            )
        specs = [
            ToolSpec(
                function=FunctionSpec(name=t.name, description=t.description, parameters=t.schema())
            )
            for t in chosen
        ]
        account = AccountRef(caller.uid, self.users.account)
        seq = 0

        async def send(note: dict[str, Any]) -> None:
            nonlocal seq
            if emit is not None:
                await emit({**note, "seq": seq})
                seq += 1

        async def content(note: dict[str, Any]) -> None:
            # The pieces of each reply, numbered on in one sequence for the whole call.
            await send({k: v for k, v in note.items() if k != "seq"})

        async def ask(pending: Pending) -> None:
            await send({"content": "", "confirm": pending.as_dict()})

        async def syscall(name: str, params: dict[str, Any]) -> dict[str, Any]:
            return await self._dispatch(name, params, caller)

        messages = list(p.messages)
        steps: list[Step] = []
        prompt = completion = 0
        t0 = time.monotonic()
        first_token: float | None = None
        notes: list[str] = []
        last: ChatResult | None = None
        finish: str | None = None
        answer_now = False
        for reply in range(p.max_steps):
            # The last reply must be the answer, and so must the one after a call that only
            # repeats the one before (its result is already there to read).
            choice = "none" if answer_now or reply == p.max_steps - 1 else p.tool_choice
            step_params = p.model_copy(
                update={
                    "messages": messages,
                    "tools": specs,
                    "use_tools": None,
                    "tool_choice": choice,
                }
            )
            try:
                last = await self.chat.chat(step_params, caller, content if emit else None)
            except ContextTooLong as exc:
                if last is None:
                    raise
                notes.append(f"the tool loop stopped: {exc.message}")
                finish = "context"
                break
            prompt += last.usage.prompt_tokens
            completion += last.usage.completion_tokens
            if first_token is None and last.timings.first_token_ms is not None:
                first_token = last.timings.first_token_ms
            calls = last.message.tool_calls or []
            if not calls:
                finish = last.finish_reason
                break
            before = [(s.tool, s.arguments) for s in steps if s.reply == reply - 1]
            answer_now = [(c.name, c.arguments) for c in calls] == before
            messages.append(
                Message(role="assistant", content=last.message.content, tool_calls=calls)
            )
            for call in calls:
                try:
                    out = await self.tools.call(
                        caller,
                        account,
                        call.name,
                        call.arguments,
                        timeout=None,
                        syscall=syscall,
                        ask=ask if emit is not None else None,
                        via="llm.chat",
                    )
                    step = Step(
                        reply=reply,
                        tool=call.name,
                        arguments=call.arguments,
                        ok=out["ok"],
                        output=out.get("output"),
                        error=out.get("error"),
                        elapsed_ms=out["elapsed_ms"],
                    )
                except AiosError as exc:
                    step = Step(
                        reply=reply,
                        tool=call.name,
                        arguments=call.arguments,
                        ok=False,
                        error={"kind": "refused", "message": exc.message},
                        elapsed_ms=0.0,
                    )
                steps.append(step)
                await send({"content": "", "step": step.model_dump()})
                messages.append(Message(role="tool", tool_name=call.name, content=for_model(step)))
        else:  # (only a model that ignores tool_choice "none" gets here)
            finish = "max_steps"
            notes.append(
                f"the tool loop stopped after {p.max_steps} model replies (max_steps) "
                "without an answer"
            )
        assert last is not None
        end = time.monotonic()
        return last.model_copy(
            update={
                "finish_reason": finish,
                "usage": Usage(prompt_tokens=prompt, completion_tokens=completion),
                "timings": Timings(
                    queued_ms=last.timings.queued_ms,
                    first_token_ms=first_token,
                    total_ms=round((end - t0) * 1000, 2),
                ),
                "notes": [*last.notes, *notes],
                "steps": steps,
            }
        )
