"""`wf`: the command line for the workflow services.

Output is for people on a terminal (tables, a live progress bar) and for scripts otherwise
(plain lines, or JSON with --json); exit codes say what happened (see `wf --help`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import shtab
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Column, Table

from workflow_client.calls import state_of
from workflow_client.errors import WorkflowError
from workflow_client.sync import EngineClient
from workflow_rpc.structs import plain
from workflow_stubs.engine.v1 import engine_pb2 as pb

EXIT_CODES = """exit codes:
  0  done (watch: the run COMPLETED)
  1  any other error
  2  bad input (usage, an invalid definition or value: INVALID_ARGUMENT)
  3  not found            4  already exists
  5  not allowed in the run's status (FAILED_PRECONDITION)
  6  a service is unreachable (UNAVAILABLE, deadline exceeded)
  7  no or a bad credential (UNAUTHENTICATED)   8  not allowed (PERMISSION_DENIED)
  10 the run FAILED      11 the run was CANCELLED
  12 the run is WAITING for an answer (wf resume RUN --value JSON)
  13 the run is PAUSED
  141 the output's reader went away (wf show RUN | head)

environment: WF_ENGINE, WF_TENANT, WF_TOKEN, WF_CA, WF_CERT, WF_KEY (defaults of the flags)"""

RUN_EXIT = {
    pb.RUN_STATUS_COMPLETED: 0,
    pb.RUN_STATUS_FAILED: 10,
    pb.RUN_STATUS_CANCELLED: 11,
    pb.RUN_STATUS_WAITING: 12,
    pb.RUN_STATUS_PAUSED: 13,
}


def status_name(status: int) -> str:
    return pb.RunStatus.Name(status).removeprefix("RUN_STATUS_")


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"wf: {what} is not JSON: {exc}") from None


class Output:
    """Where results go: rich on a terminal, plain lines or JSON otherwise."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console()
        self.rich = self.console.is_terminal and not as_json

    def json(self, value: Any) -> None:
        print(json.dumps(value, default=str), flush=True)

    def message(self, value: Any) -> None:
        """A protobuf message as JSON (field names as in the proto)."""
        self.json(plain_message(value))


def plain_message(message: Message) -> dict[str, Any]:
    """A message as JSON a script can use: numbers as numbers (int64 too, and a whole number
    in a run's state without ".0"), enums by their short names (WAITING, not
    RUN_STATUS_WAITING), times in RFC 3339, every field present."""
    plain: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            plain[field.name] = {k: _plain_value(entry, v) for k, v in value.items()}
        elif field.is_repeated:
            plain[field.name] = [_plain_value(field, v) for v in value]
        elif field.message_type is not None and not message.HasField(field.name):
            plain[field.name] = None
        else:
            plain[field.name] = _plain_value(field, value)
    return plain


_JSON_TYPES = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)


def _plain_value(field: Any, value: Any) -> Any:
    if field.enum_type is not None:
        if value not in field.enum_type.values_by_number:
            return value  # a number this client does not know: as it came
        name = field.enum_type.values_by_number[value].name
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", field.enum_type.name).upper() + "_"
        return name.removeprefix(prefix)
    if field.message_type is None:
        return value
    if field.message_type.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return value.ToJsonString()
    if field.message_type.full_name in _JSON_TYPES:
        return plain(json_format.MessageToDict(value))  # Struct numbers are doubles
    return plain_message(value)


def _run_row(run: pb.Run) -> list[str]:
    return [
        run.run_id,
        run.workflow_id,
        str(run.version),
        status_name(run.status),
        run.updated_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
    ]


def cmd_register(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    import yaml

    from workflow_client.calls import load_definition

    try:
        definition = load_definition(args.file)
    except OSError as exc:
        raise SystemExit(f"wf: cannot read {args.file}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SystemExit(f"wf: {args.file} is not YAML{at}: {what}") from None
    except (ValueError, json_format.ParseError) as exc:
        raise SystemExit(f"wf: {args.file} is not a workflow definition: {exc}") from None
    done = engine.register(definition)
    if out.as_json:
        out.message(done)
    else:
        what = "new version" if done.created else "unchanged"
        print(f"{done.workflow_id} version {done.version} ({what})")
    return 0


def cmd_start(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    run_input = parse_json(args.input, "--input") if args.input else {}
    if not isinstance(run_input, dict):
        raise SystemExit("wf: --input must be a JSON object")
    run = engine.start_run(
        args.workflow,
        run_input,
        version=args.version,
        run_id=args.run_id,
        request_id=args.request_id,
        interrupt_before=args.interrupt_before,
        interrupt_after=args.interrupt_after,
    )
    if out.as_json:
        out.message(run)
    else:
        print(run.run_id, flush=True)  # alone on its line: RUN=$(wf start ...)
    if args.watch:
        return watch(engine, run.run_id, out, follow=False)
    return 0


def cmd_watch(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    return watch(engine, args.run, out, follow=args.follow, after_seq=args.after_seq)


def watch(engine: EngineClient, run_id: str, out: Output, follow: bool, after_seq: int = 0) -> int:
    """Follow a run until it ends (or waits for an answer or is paused, unless `follow`)."""
    run = engine.get_run(run_id)
    events = engine.watch(run_id, after_seq)
    stops = _stopper(engine, run_id, follow)
    if out.rich:
        status = _watch_bar(run, events, out.console, stops)
    else:
        status = _watch_lines(events, out, stops)
    final = engine.get_run(run_id)
    if status is None:  # the stream ended: the run is over
        status = final.status
    if not out.as_json:
        line = f"run {run_id}: {status_name(status)}"
        if final.error:
            line += f" ({final.error})"
        if status == pb.RUN_STATUS_WAITING:
            line += f": {final.waiting_for!r}; answer with: wf resume {run_id} --value JSON"
        print(line, file=sys.stderr if not out.rich else sys.stdout, flush=True)
    return RUN_EXIT.get(status, 0)


def _stopper(engine: EngineClient, run_id: str, follow: bool) -> Callable[[pb.RunEvent], bool]:
    """Whether to stop watching at this event: the run now waits for an answer or is paused.
    A replayed WAITING or PAUSED that the run has since left does not stop the watch."""

    def stops(event: pb.RunEvent) -> bool:
        if follow or event.type != "run.status":
            return False
        if event.status not in (pb.RUN_STATUS_WAITING, pb.RUN_STATUS_PAUSED):
            return False
        return engine.get_run(run_id).status == event.status

    return stops


def _describe(event: pb.RunEvent) -> str:
    parts = [event.type]
    if event.node_id:
        parts.append(event.node_id)
    if event.type == "run.status" and event.status:
        parts.append(status_name(event.status))
    if event.attempt > 1:
        parts.append(f"attempt {event.attempt}")
    if event.HasField("duration"):
        parts.append(f"{event.duration.ToTimedelta().total_seconds():.2f}s")
    if event.error:
        parts.append(event.error)
    return " ".join(parts)


def _watch_lines(
    events: Iterator[pb.RunEvent], out: Output, stops: Callable[[pb.RunEvent], bool]
) -> int | None:
    for event in events:
        if out.as_json:
            out.message(event)
        else:
            if event.type == "checkpoint.saved":
                continue  # progress is in the node events; `wf checkpoints` lists these
            eta = f" eta {event.eta_seconds:.1f}s" if event.eta_seconds else ""
            print(
                f"{event.seq:>5} [{event.progress_percent:5.1f}%] "
                f"{event.completed_nodes}/{event.total_nodes}{eta} {_describe(event)}",
                flush=True,
            )
        if stops(event):
            return event.status
    return None


def _watch_bar(
    run: pb.Run,
    events: Iterator[pb.RunEvent],
    console: Console,
    stops: Callable[[pb.RunEvent], bool],
) -> int | None:
    running: list[str] = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[eta]}"),
        TextColumn("[cyan]{task.fields[now]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(
            run.workflow_id or run.run_id,
            total=run.total_nodes or None,
            completed=run.completed_nodes,
            eta="",
            now="",
        )
        for event in events:
            if event.type == "node.started" and event.node_id not in running:
                running.append(event.node_id)
            elif event.type in ("node.completed", "node.failed", "node.skipped"):
                if event.node_id in running and event.type != "node.failed":
                    running.remove(event.node_id)
            if event.type != "checkpoint.saved":
                progress.console.print(f"[dim]{event.seq:>5}[/dim] {_describe(event)}")
            update: dict[str, Any] = {"now": ", ".join(running[:4])}
            if event.total_nodes:
                update |= {"total": event.total_nodes, "completed": event.completed_nodes}
            update["eta"] = f"eta {event.eta_seconds:.1f}s" if event.eta_seconds else ""
            progress.update(task, **update)
            if stops(event):
                return event.status
    return None


def cmd_runs(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    statuses = [pb.RunStatus.Value(f"RUN_STATUS_{s.upper()}") for s in args.status or []]
    # The pages it needs, not every page (the iterator fetches them as they are read).
    runs = list(itertools.islice(engine.list_runs(args.workflow, statuses, args.limit), args.limit))
    if out.as_json:
        out.json([plain_message(r) for r in runs])
        return 0
    headers = ("run", "workflow", "version", "status", "updated")
    _print_table(out, headers, [_run_row(r) for r in runs])
    return 0


def cmd_audit(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    entries = list(itertools.islice(engine.audit(args.after, min(args.limit, 1000)), args.limit))
    if out.as_json:
        out.json([plain_message(e) for e in entries])
        return 0
    headers = ("seq", "when", "who", "action", "target", "details")
    rows = [
        [
            str(e.seq),
            e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            e.subject,
            e.action,
            e.target,
            json.dumps(json_format.MessageToDict(e.details), separators=(",", ":"))
            if e.details.fields
            else "",
        ]
        for e in entries
    ]
    _print_table(out, headers, rows)
    return 0


def _print_table(out: Output, headers: tuple[str, ...], rows: list[list[str]]) -> None:
    """Rows as a table on a terminal, tab-separated lines otherwise. On a terminal the first
    column (the id a user copies into the next command) is never cut; the others fold onto
    more lines when the terminal is narrow."""
    if not out.rich:
        for row in rows:
            print("\t".join(row))
        return
    whole = max((len(row[0]) for row in rows), default=0)
    table = Table(
        Column(headers[0], no_wrap=True, min_width=max(whole, len(headers[0]))),
        *(Column(header, overflow="fold") for header in headers[1:]),
    )
    for row in rows:
        table.add_row(*row)
    out.console.print(table)


def cmd_show(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    run = engine.get_run(args.run)
    if out.as_json:
        out.message(run)
        return 0
    rows = [
        ("run", run.run_id),
        ("workflow", f"{run.workflow_id} v{run.version}"),
        ("status", status_name(run.status)),
        ("progress", f"{run.completed_nodes}/{run.total_nodes} ({run.progress_percent:.1f}%)"),
        ("head checkpoint", run.head_checkpoint_id),
        ("updated", run.updated_at.ToDatetime().isoformat(sep=" ", timespec="seconds")),
    ]
    if run.error:
        rows.append(("error", run.error))
    if run.waiting_for:
        rows.append(("waiting for", run.waiting_for))
    for key, value in rows:
        print(f"{key:>16}: {value}")
    print(json.dumps(state_of(run), indent=2))
    return 0


def cmd_pause(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    return _report(engine.pause_run(args.run), out)


def cmd_resume(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    value = parse_json(args.value, "--value") if args.value is not None else None
    return _report(engine.resume_run(args.run, value), out)


def cmd_cancel(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    return _report(engine.cancel_run(args.run, args.reason), out)


def cmd_completion(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    """`eval "$(wf completion bash)"`, or save it where the shell loads completions from."""
    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def _report(run: pb.Run, out: Output) -> int:
    if out.as_json:
        out.message(run)
    else:
        print(f"run {run.run_id}: {status_name(run.status)}")
    return 0


def cmd_checkpoint(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    metadata = dict(args.meta or [])
    checkpoint_id = engine.checkpoint_run(args.run, args.name, metadata)
    if out.as_json:
        out.json({"checkpoint_id": checkpoint_id})
    else:
        print(checkpoint_id)
    return 0


def cmd_checkpoints(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    found = list(engine.history(args.run))
    if out.as_json:
        out.json([plain_message(c) for c in found])
        return 0
    headers = ("checkpoint", "step", "trigger", "name", "done", "progress", "created")
    rows = []
    for c in found:
        row = [
            c.checkpoint_id,
            str(c.step),
            pb.CheckpointTrigger.Name(c.trigger).removeprefix("CHECKPOINT_TRIGGER_"),
            c.name,
            str(len(c.completed_node_ids)),
            f"{c.progress_percent:.0f}%",
            c.created_at.ToDatetime().strftime("%H:%M:%S.%f")[:-3],
        ]
        rows.append(row)
    _print_table(out, headers, rows)
    return 0


def cmd_fork(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    patch = parse_json(args.patch, "--patch") if args.patch else {}
    if not isinstance(patch, dict):
        raise SystemExit("wf: --patch must be a JSON object")
    run = engine.fork_run(args.run, args.checkpoint, patch, args.run_id)
    if out.as_json:
        out.message(run)
    else:
        print(run.run_id, flush=True)
    return 0


def cmd_versions(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    listed = engine.versions(args.workflow)
    if out.as_json:
        out.message(listed)
        return 0
    headers = ("when", "change", "version", "previous", "by", "reason")
    rows = [
        [
            h.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            h.kind,
            str(h.version),
            str(h.previous_version or ""),
            h.requested_by,
            h.reason,
        ]
        for h in listed.history
    ]
    _print_table(out, headers, rows)
    if not out.as_json:
        print(f"active version: {listed.active_version}")
    return 0


def cmd_rollback(args: argparse.Namespace, engine: EngineClient, out: Output) -> int:
    done = engine.rollback(args.workflow, args.version, args.reason, args.by)
    if out.as_json:
        out.message(done)
    else:
        was = done.previous_version
        print(f"{args.workflow}: version {done.active_version} active (was {was})")
    return 0


Command = Callable[[argparse.Namespace, EngineClient, Output], int]


_JSON_HELP = "JSON output, one value per line (errors too, on stderr)"


def _version() -> str:
    try:
        return importlib.metadata.version("workflow-client")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wf",
        description="Register workflows, start, watch and steer runs.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engine",
        default=os.environ.get("WF_ENGINE", "127.0.0.1:50052"),
        help="host:port of engine_svc (default: $WF_ENGINE, else 127.0.0.1:50052)",
    )
    parser.add_argument(
        "--tenant",
        default=os.environ.get("WF_TENANT"),
        help="the tenant whose workflows and runs these are (default: $WF_TENANT, else the "
        "--token's tenant, else default)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument(
        "--token",
        default=os.environ.get("WF_TOKEN"),
        help="bearer token, for an engine that checks credentials (default: $WF_TOKEN)",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument(
        "--ca",
        "--ca-file",
        dest="ca_file",
        default=os.environ.get("WF_CA"),
        help="PEM root certificates for TLS (default: $WF_CA)",
    )
    parser.add_argument(
        "--cert",
        dest="cert_file",
        default=os.environ.get("WF_CERT"),
        help="PEM client certificate, for an engine that asks for one (mTLS; default: $WF_CERT)",
    )
    parser.add_argument(
        "--key",
        dest="key_file",
        default=os.environ.get("WF_KEY"),
        help="PEM private key of --cert (default: $WF_KEY)",
    )
    parser.add_argument("--json", action="store_true", help=_JSON_HELP)
    parser.add_argument("--version", action="version", version=f"wf {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --json after the command too (`wf start X --json`); SUPPRESS: no default of its own
    # to overwrite the one given before the command.
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=_JSON_HELP
    )

    def command(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[json_flag])
        sub.set_defaults(handler=handler)
        return sub

    sub = command("register", cmd_register, "register a workflow definition (JSON or YAML)")
    sub.add_argument("file")
    sub = command("start", cmd_start, "start a run; prints its id")
    sub.add_argument("workflow")
    sub.add_argument("--input", help="the run's input, a JSON object")
    sub.add_argument("--version", type=int, default=0, help="0: the active version")
    sub.add_argument("--run-id", default="", help="the new run's id (default: a new UUID)")
    sub.add_argument("--request-id", default="", help="a retried start returns the same run")
    sub.add_argument("--watch", action="store_true", help="then watch it")
    sub.add_argument(
        "--interrupt-before", action="append", metavar="NODE", help="pause before NODE starts"
    )
    sub.add_argument(
        "--interrupt-after", action="append", metavar="NODE", help="pause once NODE is done"
    )
    sub = command("watch", cmd_watch, "follow a run live until it ends, waits or pauses")
    sub.add_argument("run")
    sub.add_argument(
        "--after-seq", type=int, default=0, help="only events after this seq (default: all)"
    )
    sub.add_argument("--follow", action="store_true", help="keep going through waits and pauses")
    sub = command("runs", cmd_runs, "list runs, newest first")
    sub.add_argument("--workflow", default="", help="only runs of this workflow")
    sub.add_argument("--status", action="append", help="only runs in this status (repeatable)",
        choices=["pending", "running", "paused", "waiting", "completed", "failed", "cancelled"],
    )  # fmt: skip
    sub.add_argument("--limit", type=_positive, default=50, help="at most this many (default: 50)")
    sub = command("show", cmd_show, "a run's status, progress and state")
    sub.add_argument("run")
    sub = command("pause", cmd_pause, "pause a run: running nodes finish, no new ones start")
    sub.add_argument("run")
    sub = command("resume", cmd_resume, "continue a paused or failed run, or answer a waiting one")
    sub.add_argument("run")
    sub.add_argument("--value", help="the answer to an approval, JSON")
    sub = command("cancel", cmd_cancel, "cancel a run at once")
    sub.add_argument("run")
    sub.add_argument("--reason", default="", help="recorded as the run's error")
    sub = command("checkpoints", cmd_checkpoints, "a run's checkpoint history, newest first")
    sub.add_argument("run")
    sub = command("fork", cmd_fork, "a new run from one of a run's checkpoints; prints its id")
    sub.add_argument("run")
    sub.add_argument("checkpoint", help="a checkpoint id from `wf checkpoints RUN`")
    sub.add_argument("--patch", help="JSON object merged into the state: input, node outputs")
    sub.add_argument("--run-id", default="", help="the new run's id (default: a new UUID)")
    sub = command(
        "audit",
        cmd_audit,
        "who paused, resumed, cancelled, forked, rolled back, "
        "deleted or pruned what, oldest first (needs the admin role)",
    )
    sub.add_argument("--after", type=int, default=0, metavar="SEQ", help="entries after this seq")
    sub.add_argument(
        "--limit", type=_positive, default=100, help="at most this many entries (default 100)"
    )
    sub = command("versions", cmd_versions, "a workflow's versions and who activated which")
    sub.add_argument("workflow")
    sub = command("rollback", cmd_rollback, "make a version of a workflow the active one")
    sub.add_argument("workflow")
    sub.add_argument("version", type=int)
    sub.add_argument("--reason", default="", help="recorded in the version history")
    sub.add_argument("--by", default=os.environ.get("USER", ""), help="who (default $USER)")
    sub = command("checkpoint", cmd_checkpoint, "take a named manual checkpoint of a run")
    sub.add_argument("run")
    sub.add_argument("--name", required=True, help="the checkpoint's name")
    sub.add_argument(
        "--meta",
        action="append",
        metavar="KEY=VALUE",
        type=_key_value,
        help="metadata of the checkpoint (repeatable)",
    )
    sub = command("completion", cmd_completion, "print a shell completion script")
    sub.add_argument("shell", choices=shtab.SUPPORTED_SHELLS)
    return parser


def _connection_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tenant": args.tenant,
        "timeout": args.timeout,
        "tls": args.tls,
        "ca_file": args.ca_file,
        "cert_file": args.cert_file,
        "key_file": args.key_file,
        "token": args.token,
    }


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(args.json)
    engine = EngineClient(args.engine, **_connection_options(args))
    try:
        return args.handler(args, engine, out)
    except WorkflowError as exc:
        if args.json:
            violations = [{"field": f, "description": d} for f, d in exc.violations]
            error = {"code": exc.code.name, "message": exc.details, "violations": violations}
            print(json.dumps({"error": error}), file=sys.stderr)
        else:
            print(f"wf: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        engine.close()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def main() -> None:
    try:
        code = run()
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        sys.exit(code)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # our own "wf: ..." messages: bad input
            if "--json" in sys.argv[1:]:
                message = exc.code.removeprefix("wf: ")
                error = {"code": "INVALID_ARGUMENT", "message": message, "violations": []}
                print(json.dumps({"error": error}), file=sys.stderr)
            else:
                print(exc.code, file=sys.stderr)
            sys.exit(2)
        raise
    except BrokenPipeError:
        # The reader stopped (`wf show RUN | head`): what is left of the output goes nowhere,
        # and Python's flush at exit must not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # as a shell reports a process ended by SIGPIPE
