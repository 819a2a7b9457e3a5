"""A firm's ClientApp process: long-lived, running only the installed fedcrm ClientApp.

The firm's SuperNode runs with ``--isolation process``: it starts no ClientApp itself, it queues
each message from the coordinator as a task on its local Runtime API (127.0.0.1). This process
is the only one that takes those tasks. For each task it

1. pulls the message, the run's context and the run's app bundle (FAB) from the SuperNode;
2. checks the bundle (:func:`fedcrm.coordinator.app_bundle.bundle_refusal`): it must be exactly
   the bundle fedcrm writes for the release this firm installed - only ``pyproject.toml``, this
   firm's ClientApp reference, the same fedcrm version and app hash. Otherwise the message is
   answered with a refusal (one line) and nothing of the bundle is ever imported or installed;
3. answers with the ClientApp imported once, at start, from the installed package (torch, the
   firm's keys, its decrypted store and its privacy state stay loaded across messages);
4. pushes the reply and the task's status back to the SuperNode.

Flower's own ``flwr-clientapp`` instead installs each run's FAB, puts it first on ``sys.path`` and
imports the ClientApp from it - a new process (and a torch import) per message, and whatever code
the bundle ships.

Run as ``python -m fedcrm.clients.runtime --runtime-api-address 127.0.0.1:PORT``
(:func:`fedcrm.clients.node.start_supernode` does).
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import sys
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import (  # type: ignore[attr-defined]
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from fedcrm.clients.node import NODE_CONFIG_KEY
from fedcrm.coordinator.app_bundle import (
    FEDCRM_CLIENTAPP,
    PYPROJECT,
    AppRelease,
    BundleRefusal,
    Refusal,
    bundle_refusal,
    installed_release,
)
from fedcrm.data.contract import load_firm_config
from fedcrm.flower.records import reply
from fedcrm.privacy.errors import FedcrmError
from fedcrm.protocol import ErrorReply

log = logging.getLogger("fedcrm.clients.runtime")

#: Seconds between two polls of the SuperNode for a new task (a local HTTP call).
POLL_S = 0.2
#: Written to the log once the ClientApp is imported and the process takes tasks.
READY = "fedcrm ClientApp process ready"
_COMPONENT = "flwr-clientapp"  # the Runtime API checks the caller's component and version


@dataclass(frozen=True)
class ApprovedApp:
    """The one ClientApp this firm runs, and the release its bundles must declare."""

    ref: str
    app: ClientApp
    release: AppRelease


def load_approved_app(ref: str = FEDCRM_CLIENTAPP) -> ApprovedApp:
    """Import the ClientApp ``module:attribute`` from the installed packages (once)."""
    module, _, attribute = ref.partition(":")
    app = getattr(importlib.import_module(module), attribute)
    if not isinstance(app, ClientApp):
        raise TypeError(f"{ref} is not a Flower ClientApp")
    return ApprovedApp(ref=ref, app=app, release=installed_release())


def _client(address: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name=_COMPONENT)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors,  # type: ignore[arg-type]
    )


def _refusal(fab: Fab, context: Context, approved: ApprovedApp) -> BundleRefusal | None:
    try:
        with zipfile.ZipFile(io.BytesIO(fab.content)) as bundle:
            files = bundle.namelist()
            pyproject = tomllib.loads(bundle.read(PYPROJECT).decode()) if PYPROJECT in files else {}
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return BundleRefusal(Refusal.NOT_THE_APP, "the run's app bundle is not a readable FAB")
    return bundle_refusal(
        files=files, pyproject=pyproject, run_config=dict(context.run_config),
        clientapp=approved.ref, release=approved.release,
    )


def _firm_name(context: Context) -> str:
    try:
        return load_firm_config(Path(str(context.node_config.get(NODE_CONFIG_KEY, "")))).firm.name
    except (FedcrmError, OSError):
        return ""


def _refused(message: Message, context: Context, refusal: BundleRefusal) -> Message:
    if refusal.kind is Refusal.OTHER_RELEASE:
        # a fedcrm run for another release: answer in the protocol, so the coordinator names the
        # firm and shows why it stops
        return reply(message, ErrorReply(firm=_firm_name(context), detail=refusal.detail).encode())
    return Message(Error(code=ErrorCode.INVALID_FAB, reason=refusal.detail), reply_to=message)


def serve_task(address: str, token: str, approved: ApprovedApp) -> None:
    """Answer one task the SuperNode queued (one message of one run)."""
    client = _client(address, token)

    def heartbeat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except httpx.HTTPError:
            return False

    beat = HeartbeatSender(heartbeat)
    beat.start()
    message: Message | None = None
    context: Context | None = None
    answer: Message | None = None
    status, details = SubStatus.FAILED, "the ClientApp did not answer"
    try:
        message, context, run, fab = pull_task_input(client)
        refusal = _refusal(fab, context, approved)
        if refusal is not None:
            log.warning("run %s refused: %s", run.run_id, refusal.detail)
            answer = _refused(message, context, refusal)
            status, details = SubStatus.COMPLETED, refusal.detail
        else:
            started = time.monotonic()
            answer = approved.app(message=message, context=context)
            log.info("run %s: %s answered in %.2fs", run.run_id,
                     message.metadata.message_type, time.monotonic() - started)
            status, details = SubStatus.COMPLETED, ""
    except Exception as exc:
        # details stay in this firm's own log; the coordinator gets the error type only
        log.exception("task failed")
        details = f"ClientApp raised {type(exc).__name__}"
        if message is not None:
            answer = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
    finally:
        try:
            if answer is not None and context is not None:
                push_message(client, answer, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            beat.stop()
            client.close()


def _exit_with_parent() -> None:
    """Stop when the process that started this one is gone (``fedcrm node start`` killed)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(address: str, approved: ApprovedApp, *, poll_s: float = POLL_S) -> None:
    """Take the SuperNode's ClientApp tasks one at a time, forever."""
    client = _client(address)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    log.info("%s: %s of %s, SuperNode Runtime API %s", READY, approved.ref, approved.release,
             address)
    while True:
        try:
            acquired = client.AcquireTask(request)
        except httpx.HTTPError as exc:  # the SuperNode is starting or restarting
            log.debug("no task: %s", exc)
            time.sleep(1.0)
            continue
        if acquired.HasField("task") and acquired.token:
            serve_task(address, acquired.token, approved)
        else:
            time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the firm's SuperNode Runtime API, 127.0.0.1:PORT")
    parser.add_argument("--app", default=FEDCRM_CLIENTAPP,
                        help="the installed ClientApp to run (module:attribute)")
    parser.add_argument("--poll", type=float, default=POLL_S, help="seconds between task polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    _exit_with_parent()
    serve(args.runtime_api_address, load_approved_app(args.app), poll_s=args.poll)


if __name__ == "__main__":
    main()
