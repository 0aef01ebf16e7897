/**
 * Errors of the QMP client. Every one carries a stable `code`, a one-line message and a hint.
 *
 *   QsnapError                          src/errors.ts
 *   └── QmpError                        (abstract root of this module)
 *       ├── QmpConnectError             QSNAP_QMP_CONNECT       details.reason: ConnectFailure (busy: another client holds the monitor)
 *       ├── QmpCommandError             QSNAP_QMP_COMMAND       QEMU's {class, desc} for one command
 *       ├── QmpProtocolError            QSNAP_QMP_PROTOCOL      details.reason: ProtocolFailure
 *       ├── QmpDisconnectedError        QSNAP_QMP_DISCONNECTED  details.reason: DisconnectReason
 *       ├── QmpTimeoutError             QSNAP_QMP_TIMEOUT       a command or an awaited event
 *       └── QmpEventOverflowError       QSNAP_QMP_EVENT_OVERFLOW an event iterator fell too far behind
 *
 * Structured fields are also copied into `details`, so `toJSON()` (the `--json` form) carries them.
 */
import { QsnapError } from '../errors.js';

export abstract class QmpError extends QsnapError {}

/** Why a connection could not be established. */
export type ConnectFailure = 'no-socket' | 'refused' | 'not-qmp' | 'busy' | 'timeout' | 'permission';

/** Which step of `QmpClient.connect` was under way. */
export type ConnectPhase = 'connect' | 'greeting' | 'capabilities';

const CONNECT_TEXT: Record<ConnectFailure, (target: string) => { message: string; hint: string }> = {
  'no-socket': (t) => ({
    message: `no QMP socket at ${t}`,
    hint: `is QEMU running with -qmp unix:${t},server=on,wait=off?`,
  }),
  refused: (t) => ({
    message: `QMP endpoint ${t} refused the connection`,
    hint: 'QEMU may have exited and left its socket file behind; check that the VM is running',
  }),
  'not-qmp': (t) => ({
    message: `${t} did not complete a QMP handshake`,
    hint: 'point qsnap at the -qmp socket (not -monitor or a serial port); QEMU serves one QMP client per socket, so check that no other client holds it',
  }),
  busy: (t) => ({
    message: `the QMP monitor at ${t} is in use by another client (libvirt?): QEMU answers one client per monitor`,
    hint: 'give qsnap a QMP monitor of its own: add -qmp unix:<path>,server=on,wait=off (libvirt: <qemu:commandline>, see the README)',
  }),
  timeout: (t) => ({
    message: `timed out connecting to QMP at ${t}`,
    hint: 'QEMU may be hung or overloaded; check the VM, or raise the connect timeout',
  }),
  permission: (t) => ({
    message: `no permission to connect to QMP at ${t}`,
    hint: 'run qsnap as the user that owns the socket, or fix its mode',
  }),
};

export class QmpConnectError extends QmpError {
  readonly reason: ConnectFailure;
  readonly target: string;

  constructor(
    target: string,
    reason: ConnectFailure,
    options: { cause?: unknown; details?: Record<string, unknown>; message?: string } = {},
  ) {
    const text = CONNECT_TEXT[reason](target);
    super('QSNAP_QMP_CONNECT', options.message ?? text.message, {
      hint: text.hint,
      cause: options.cause,
      details: { reason, target, ...options.details },
    });
    this.reason = reason;
    this.target = target;
  }
}

/** Hints for the error classes QEMU uses (qapi/error.json, QapiErrorClass). */
const COMMAND_HINTS: Record<string, string> = {
  CommandNotFound: 'this QEMU does not have the command; check its version with query-version',
  DeviceNotFound: 'check the device, node or object name (query-block, query-named-block-nodes)',
  DeviceNotActive: 'the device exists but is not active; check the VM configuration',
  KVMMissingCap: 'the accelerator lacks a capability this command needs',
};

export class QmpCommandError extends QmpError {
  readonly command: string;
  /** QEMU's error class, e.g. "GenericError", "CommandNotFound", "DeviceNotFound". */
  readonly errorClass: string;
  /** QEMU's own description of the failure. */
  readonly desc: string;

  constructor(command: string, errorClass: string, desc: string) {
    super('QSNAP_QMP_COMMAND', `QMP command ${command} failed: ${desc}`, {
      hint: COMMAND_HINTS[errorClass] ?? 'QEMU refused the command; its message says why, fix that and retry',
      details: { command, errorClass, desc },
    });
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

/** What about the peer's bytes did not follow the protocol. */
export type ProtocolFailure =
  | 'malformed-json' // a line that is not JSON
  | 'line-too-long' // a line longer than the framing limit
  | 'truncated' // the stream ended inside a message
  | 'unexpected-message' // valid JSON, but no QMP message we expect here
  | 'id-less-reply' // a reply without our id: QEMU could not parse what we sent
  | 'bad-reply'; // a command's reply failing its schema

export class QmpProtocolError extends QmpError {
  readonly reason: ProtocolFailure;
  /** The command whose reply was bad, when there is one. */
  readonly command: string | undefined;

  constructor(
    reason: ProtocolFailure,
    message: string,
    options: { command?: string; cause?: unknown; details?: Record<string, unknown> } = {},
  ) {
    super('QSNAP_QMP_PROTOCOL', message, {
      hint:
        reason === 'bad-reply'
          ? 'this QEMU replied in a shape qsnap does not expect; report it with the output of qemu-system-x86_64 --version'
          : 'the QMP peer sent something that is not QMP; check that the target is a QEMU -qmp socket',
      cause: options.cause,
      details: {
        reason,
        ...(options.command === undefined ? {} : { command: options.command }),
        ...options.details,
      },
    });
    this.reason = reason;
    this.command = options.command;
  }
}

/** Why a running session ended. */
export type DisconnectReason =
  | 'peer-closed' // QEMU closed or reset the connection (exit, quit, crash); an ECONNRESET is the cause
  | 'socket-error' // the socket failed otherwise (ETIMEDOUT…); the cause is the errno error
  | 'protocol-error' // we hung up because the peer broke the protocol; the cause says how
  | 'closed-by-client'; // close() was called

export class QmpDisconnectedError extends QmpError {
  readonly reason: DisconnectReason;

  constructor(target: string, reason: DisconnectReason, cause?: unknown) {
    const why = {
      'peer-closed': 'QEMU closed the QMP connection',
      'socket-error': 'the QMP connection failed',
      'protocol-error': 'QMP connection dropped after a protocol error',
      'closed-by-client': 'QMP connection closed',
    }[reason];
    super('QSNAP_QMP_DISCONNECTED', `${why} (${target})`, {
      hint:
        reason === 'closed-by-client'
          ? 'the client was closed while this was under way; open a new connection'
          : 'check that the VM is still running (QEMU may have exited), then reconnect',
      cause,
      details: { reason, target },
    });
    this.reason = reason;
  }
}

export class QmpTimeoutError extends QmpError {
  readonly timeoutMs: number;

  constructor(what: { command: string } | { event: string }, timeoutMs: number) {
    const isCommand = 'command' in what;
    super(
      'QSNAP_QMP_TIMEOUT',
      isCommand
        ? `QMP command ${what.command} got no reply within ${timeoutMs} ms`
        : `no ${what.event} event within ${timeoutMs} ms`,
      {
        hint: isCommand
          ? 'QEMU may be busy or hung; check the VM, or raise the command timeout'
          : 'the VM did not reach the expected state in time; check its status (query-status)',
        details: { ...what, timeoutMs },
      },
    );
    this.timeoutMs = timeoutMs;
  }
}

export class QmpEventOverflowError extends QmpError {
  constructor(limit: number) {
    super('QSNAP_QMP_EVENT_OVERFLOW', `more than ${limit} QMP events were left unread`, {
      hint: 'consume events() faster, pass a filter, or raise maxBuffered',
      details: { limit },
    });
  }
}

/** One line from zod's issue list, e.g. "running: Invalid input: expected boolean, received string". */
export function summarizeIssues(
  issues: readonly { path: readonly PropertyKey[]; message: string }[],
  max = 3,
): string {
  const lines = issues
    .slice(0, max)
    .map((i) => `${i.path.length ? i.path.map(String).join('.') : '(root)'}: ${i.message}`);
  if (issues.length > max) lines.push(`… ${issues.length - max} more`);
  return lines.join('; ');
}
