"""FedModel's node executor: serves the SuperNode's tasks with installed, approved code.

Flower's default executor starts `flwr-clientapp` for every message, and that process
installs the run's app bundle (FAB) and imports whatever ClientApp it names: any
coordinator could run its own code next to the owner's data. Here the SuperNode runs
with `--isolation process` and this long-lived process is its only executor. For each
task it pulls the message and context from the SuperNode's Runtime API (127.0.0.1,
AcquireTask guarded by a shared 0600 secret), reviews the request against the owner's
policy (client/policy.py), and either runs the *installed* ClientApp in-process - torch,
Opacus and the model stay imported across messages - or answers with a refusal. The FAB
is pulled (Flower sends it with the task) but never parsed, unpacked, installed or imported.

Every task is answered: a task left without a reply holds the SuperNode forever. Each
answer is one line in this process's log and one entry in the node's hash-chained
audit log (node-audit.jsonl).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord
from flwr.clientapp import ClientApp
from flwr.common.constant import SubStatus
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.common.serde import context_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from client.ledger_guard import (
    check_ledger,
    ledger_run_id,
    record_head,
    replay_refusal,
)
from client.policy import OwnerPolicy, content_refusal, load_policy, review
from client.supernode import SECRET_FILE
from client.tasks import installed_task
from fedmodel.audit_log import AuditLog
from fedmodel.config import RunConfig
from fedmodel.errors import ExitCode
from fedmodel.protocol import (
    CONFIG_KEY,
    EVALUATION_PREFIX,
    METRICS_KEY,
    NOISE_SHARES_KEY,
    NUM_EXAMPLES_KEY,
    POLICY_REFUSED_CODE,
    SERVER_ROUND_KEY,
    TRAIN_LOSS_KEY,
)
from fedmodel.runtime.polling import backoff_waits

AUDIT_FILE = "node-audit.jsonl"
# Between AcquireTask calls on the local Runtime API: 0.1 s after a task, doubling while
# the node is idle up to 0.5 s (the granularity of the SuperNode's own reply loop), so an
# idle node costs ~1% of a core instead of ~6%
POLL_INTERVAL_S = 0.1
IDLE_POLL_INTERVAL_S = 0.5
OBJECT_RETRY_S = 0.02  # first wait for a message object the SuperNode is still receiving
# How long a task's message objects may take to arrive. Flower 1.39's SuperNode keeps the
# task of a message whose run ended while it was receiving it, with objects that never
# come (start_client_internal's RunNotRunningException branch): without a bound this
# executor would wait on that task, and leave every later one (a resumed run's) unserved.
MESSAGE_PULL_MAX_S = 60.0
# Flower's own code for "the ClientApp raised"; the reason sent is generic on purpose
CLIENT_APP_FAILED_CODE = 1
# The methods Flower's Runtime API guards with the SuperExec secret
_AUTHENTICATED_METHODS = frozenset(
    {
        "/flwr.proto.Runtime/AcquireTask",
        "/flwr.proto.Runtime/PullPendingTasks",
        "/flwr.proto.Runtime/ClaimTask",
    }
)
# Metric keys that count the owner's rows: they leave the node rounded
_COUNT_KEYS = frozenset(
    prefix + key for key in (NUM_EXAMPLES_KEY, "auroc-weight") for prefix in ("", EVALUATION_PREFIX)
)
# Records of Flower's legacy messages (flwr.compat's RecordDict form of FitIns, FitRes and
# EvaluateRes), which SecAgg+ runs use
LEGACY_FIT_CONFIG = "fitins.config"
LEGACY_FIT_METRICS = "fitres.metrics"
LEGACY_EVALUATE_METRICS = "evaluateres.metrics"
LEGACY_EVALUATE_COUNT = "evaluateres.num_examples"


class NodeExecutor:
    """Acquires the SuperNode's tasks one at a time and answers each of them."""

    def __init__(self, directory: Path, runtime_address: str, secret: bytes) -> None:
        self.directory = directory
        self.runtime_address = runtime_address
        self._apps: dict[str, ClientApp] = {}
        self._tasks = RuntimeHttpClient.from_server_address(
            server_address=runtime_address,
            insecure=True,  # 127.0.0.1 only; AcquireTask is guarded by the secret
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods=_AUTHENTICATED_METHODS
                ),
            ],
            retry_invoker=local_retry_invoker(),
        )

    def serve(self, keep_going: Callable[[], bool]) -> None:
        """Poll for tasks while `keep_going()` (the SuperNode is alive)."""
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        waits = backoff_waits(POLL_INTERVAL_S, IDLE_POLL_INTERVAL_S)
        while keep_going():
            try:
                acquired = self._tasks.AcquireTask(request)
                if acquired.HasField("task") and acquired.token:
                    self.answer(acquired.token)
                    # a run is on: its next message may follow soon
                    waits = backoff_waits(POLL_INTERVAL_S, IDLE_POLL_INTERVAL_S)
                    continue
            except httpx.HTTPError as error:  # the SuperNode is starting or stopping
                print(f"runtime API unavailable: {error}", flush=True)
            time.sleep(next(waits))

    def answer(self, token: str) -> None:
        """Pull one task, review it, run or refuse it, push the reply and the context."""
        runtime = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=local_retry_invoker(),
        )
        heartbeat = HeartbeatSender(_task_heartbeat(runtime))
        heartbeat.start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "the node could not read the task"
        try:
            try:
                message, context = pull_task(runtime)
            except ObjectPullError as error:  # answered as failed (below); the next task waits
                print(f"task dropped: its message never arrived ({error})", flush=True)
                return
            stage = secagg_stage(message)  # before secaggplus_mod takes it out of the message
            started = time.monotonic()
            try:
                reply, refusal = self._decide(message, context)
            except Exception:  # e.g. an unreadable policy: still an answer, never a hang
                traceback.print_exc()
                refusal = "the node could not review the request (see its executor.log)"
                reply = Message(Error(POLICY_REFUSED_CODE, refusal), reply_to=message)
            push_message(runtime, reply, context)
            status, details = SubStatus.COMPLETED, ""
            self._record(context, message, stage, refusal, time.monotonic() - started)
        finally:
            push_task_output(runtime, context, status, details)
            heartbeat.stop()
            runtime.close()

    def _decide(self, message: Message, context: Context) -> tuple[Message, str | None]:
        """The reply to `message`, and the refusal reason when it is a refusal."""
        policy = load_policy(self.directory)  # the owner may have changed it meanwhile
        kind = message.metadata.message_type
        refusal = review(self.directory, policy, context.run_config, kind)
        if refusal is None and kind in (MessageType.TRAIN, MessageType.EVALUATE):
            refusal = content_refusal(message)
        if refusal is not None:
            return _refusal(message, refusal), refusal
        config = RunConfig.from_run_config(context.run_config)  # review() parsed it
        run_id = ledger_run_id(config, context.run_id)
        server_round = training_round(message, config.secagg) if kind == MessageType.TRAIN else None
        if server_round is not None:
            refusal = replay_refusal(self.directory, run_id, server_round)
            if refusal is not None:
                return _refusal(message, refusal), refusal
        context.node_config["budget-epsilon"] = policy.budget_epsilon
        context.node_config["budget-delta"] = policy.budget_delta
        context.node_config[NOISE_SHARES_KEY] = policy.distributed_noise_shares
        try:
            reply = self._app(config)(message, context)
        except Exception as error:  # the coordinator learns that it failed, not why
            print(f"the ClientApp raised {type(error).__name__}: {error}", flush=True)
            failed = Error(CLIENT_APP_FAILED_CODE, "the node failed to run the task")
            return Message(failed, reply_to=message), None
        finally:
            record_head(self.directory)  # whatever the round wrote to the ledger
        return released(policy, reply), None

    def _app(self, config: RunConfig) -> ClientApp:
        task = installed_task(config.app_task)
        reference = task.secagg_client_app if config.secagg else task.client_app
        if reference not in self._apps:
            module, attribute = reference.split(":")
            self._apps[reference] = getattr(importlib.import_module(module), attribute)
        return self._apps[reference]

    def _record(
        self,
        context: Context,
        message: Message,
        stage: str | None,
        refusal: str | None,
        seconds: float,
    ) -> None:
        kind = message.metadata.message_type
        if stage is not None:
            kind = f"{kind} ({stage})"
        if refusal is None:
            print(f"run {context.run_id} {kind}: answered in {seconds:.2f} s", flush=True)
        else:
            print(f"run {context.run_id} {kind}: REFUSED: {refusal}", flush=True)
        AuditLog(self.directory / AUDIT_FILE).append(
            "served" if refusal is None else "refused",
            run=context.run_id,
            message=kind,
            **({} if refusal is None else {"reason": refusal}),
        )


def _refusal(message: Message, reason: str) -> Message:
    return Message(Error(POLICY_REFUSED_CODE, reason), reply_to=message)


def training_round(message: Message, secagg: bool) -> int | None:
    """The round a train message asks this node to train for; None for a message that
    trains nothing (SecAgg+'s key and unmask stages).

    Only a message with a training instruction counts for the replay rule, and the round
    counted is the one the run's ClientApp trains for: FedModel's train config, or in a
    SecAgg+ run the legacy FitIns config of the stage that collects masked vectors. A
    message without that round cannot train: both ClientApps read it there, and fail
    without it.
    """
    record = message.content.config_records.get(LEGACY_FIT_CONFIG if secagg else CONFIG_KEY)
    if record is None or SERVER_ROUND_KEY not in record:
        return None
    return int(str(record[SERVER_ROUND_KEY]))


def secagg_stage(message: Message) -> str | None:
    """The SecAgg+ stage a message asks for (setup, share_keys, ...), if it is one."""
    if message.metadata.message_type != MessageType.TRAIN:
        return None
    record = message.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = None if record is None else record.get(SecAggKey.STAGE)
    return stage if isinstance(stage, str) else None


def released(policy: OwnerPolicy, reply: Message) -> Message:
    """The reply as the owner's release rules allow: counts rounded, loss withheld,
    evaluation metrics only when the owner releases them.

    Legacy replies (SecAgg+'s) carry their metrics in a ConfigRecord and the example
    count in its own record; the same rules shape them. A train reply's legacy count is
    its weight in the secure sum (1 on a deployed node), not a count of rows.
    """
    if reply.has_error():
        return reply
    records = reply.content
    if METRICS_KEY in records.metric_records:
        records[METRICS_KEY] = MetricRecord(_shaped(policy, records.metric_records[METRICS_KEY]))
    for name in (LEGACY_FIT_METRICS, LEGACY_EVALUATE_METRICS):
        if name in records.config_records:
            records[name] = ConfigRecord(_shaped(policy, records.config_records[name]))
    if LEGACY_EVALUATE_COUNT in records.metric_records:
        count = records.metric_records[LEGACY_EVALUATE_COUNT]
        records[LEGACY_EVALUATE_COUNT] = MetricRecord(
            {key: _rounded(policy, value) for key, value in count.items()}
        )
    return reply


def _shaped(policy: OwnerPolicy, metrics: Mapping[str, Any]) -> dict[str, Any]:
    shaped = {}
    for key, value in metrics.items():
        if key == TRAIN_LOSS_KEY and not policy.release_train_loss:
            continue
        if key.startswith(EVALUATION_PREFIX) and not policy.release_evaluation:
            continue
        shaped[key] = _rounded(policy, value) if key in _COUNT_KEYS else value
    return shaped


def _rounded(policy: OwnerPolicy, value: Any) -> Any:
    """A count of rows as it leaves the node: rounded to the owner's step, at least one step."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        step = policy.count_rounding
        return max(step, step * round(float(value) / step))
    return value


def pull_task(runtime: RuntimeHttpClient) -> tuple[Message, Context]:
    """The task's message and run context; the FAB that comes with them is left unparsed.

    Flower's own `pull_task_input` waits 1 s, then 2 s, ... for message objects that the
    SuperNode is still downloading when the task appears (it creates the task first);
    here the first retries come after 20 ms, which saves about 1 s per message.
    """
    task = runtime.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task.task_id
    TaskIdentity.run_id = task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    pulled = runtime.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed over a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(runtime.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            runtime.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        max_time=MESSAGE_PULL_MAX_S,
        initial_backoff=OBJECT_RETRY_S,
        backoff_cap=0.5,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's own pull does
    return message, context


def local_retry_invoker(max_time: float = 10.0) -> RetryInvoker:
    """Retries for calls to the SuperNode on 127.0.0.1: transport errors and 503/504, for
    at most `max_time` seconds; any other HTTP status is raised at once.

    Flower's own HTTP invoker answers a 401 by sending SIGINT to its process, which
    would end this long-lived executor on one expired task token.
    """

    def give_up(error: Exception) -> bool:
        if isinstance(error, httpx.HTTPStatusError):
            return error.response.status_code not in (503, 504)
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(base_delay=0.1, max_delay=1),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=give_up,
    )


def _task_heartbeat(runtime: RuntimeHttpClient) -> Callable[[], bool]:
    """Keep the task alive; unlike Flower's, never signals this long-lived process."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            runtime.SendTaskHeartbeat(request)
        except httpx.HTTPError:
            return False
        return True

    return beat


def _alive(pid: int) -> Callable[[], bool]:
    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    return alive


def main(argv: list[str] | None = None) -> None:
    """`python -m client.executor`: started and stopped by `fedmodel client start`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="node directory")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--supernode-pid", type=int, required=True)
    args = parser.parse_args(argv)
    secret = (args.dir / SECRET_FILE).read_bytes()
    check_ledger(args.dir, load_policy(args.dir))  # fail at once on a broken policy or ledger
    try:
        executor = NodeExecutor(args.dir, args.runtime_api_address, secret)
        print(f"node executor serving {args.runtime_api_address}", flush=True)
        executor.serve(_alive(args.supernode_pid))
    except (Exception, KeyboardInterrupt):  # without an executor the SuperNode would hang
        traceback.print_exc()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(args.supernode_pid, signal.SIGTERM)
        sys.exit(ExitCode.FAILED)


if __name__ == "__main__":
    main()
