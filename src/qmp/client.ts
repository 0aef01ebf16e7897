/**
 * The QMP client: handshake, then one read loop routing every message.
 *
 *   idle ──connect()──▶ connecting ──greeting + qmp_capabilities──▶ running
 *                           │ failure: socket destroyed, timer cleared           │ peer closed, socket error,
 *                           ▼                                                    │ protocol error, close()
 *                      disconnected ◀──────────── socket closed ◀── disconnecting ◀┘
 *
 * `QmpClient.connect` hands out a client only once it is running, so a failed connect leaves
 * nothing behind. The handshake uses raw reads on the paused socket; the read loop ('data'
 * events into the framing decoder, then `#onMessage`) starts only after it succeeds.
 */
import type { Socket } from 'node:net';
import type { z } from 'zod';
import { type CommandArgs, type CommandName, type CommandReturn, commands } from './commands.js';
import {
  type ConnectPhase,
  type DisconnectReason,
  QmpCommandError,
  QmpConnectError,
  QmpDisconnectedError,
  QmpError,
  QmpProtocolError,
  QmpTimeoutError,
  summarizeIssues,
} from './errors.js';
import {
  type EventFilter,
  EventHub,
  type EventListener,
  type EventName,
  isTimerDelay,
  type QmpEvent,
  type WaitForOptions,
} from './events.js';
import { DEFAULT_MAX_LINE_BYTES, encodeMessage, JsonLineDecoder } from './framing.js';
import { parseMessage, type QmpMessage } from './message.js';
import { isMonitorHeld } from './monitor-held.js';
import { describeTarget, openTransport, parseTarget, type QmpTarget } from './transport.js';

export interface QmpLogger {
  debug?(message: string, fields?: Record<string, unknown>): void;
  warn?(message: string, fields?: Record<string, unknown>): void;
  error?(message: string, fields?: Record<string, unknown>): void;
}

export interface QmpClientOptions {
  /** One deadline for connect(2), the greeting and qmp_capabilities. Default 5000. */
  connectTimeoutMs?: number;
  /** Default per-command reply timeout; Infinity for none. Default 30000. */
  commandTimeoutMs?: number;
  logger?: QmpLogger;
  /** Longest message accepted from QEMU. Default 16 MiB. */
  maxLineBytes?: number;
}

export interface ExecuteOptions {
  /** Overrides the client's commandTimeoutMs for this command. */
  timeoutMs?: number;
  /** Stops waiting (rejects with `signal.reason`); QEMU still runs the command. */
  signal?: AbortSignal;
}

export type QmpClientState = 'idle' | 'connecting' | 'running' | 'disconnecting' | 'disconnected';

/** What QEMU said about itself in its greeting. */
export interface QmpGreeting {
  version: { major: number; minor: number; micro: number };
  /** Distribution build string, e.g. "Debian 1:7.2+dfsg-7+deb12u18+b3"; may be empty. */
  package: string;
  /** Capabilities the server offers (7.2: ["oob"]). qsnap enables none. */
  capabilities: string[];
}

/** Arguments may be left out when the command has no required ones (`{}` is assignable). */
type ExecuteRest<N extends CommandName> =
  Record<never, never> extends CommandArgs<N>
    ? [args?: CommandArgs<N>, options?: ExecuteOptions]
    : [args: CommandArgs<N>, options?: ExecuteOptions];

type ReplyMessage = Extract<QmpMessage, { kind: 'return' | 'error' }>;

interface PendingCommand {
  command: string;
  settle(reply: ReplyMessage): void;
  fail(error: Error): void;
}

/** The id of qmp_capabilities during the handshake; commands count up from 1. */
const NEGOTIATION_ID = 0;
/** How often a late greeting makes the client look for another holder of the monitor. */
const HELD_CHECK_MS = 250;
/** Bytes of handshake input after which a peer that has not greeted us is not QMP. */
const MAX_HANDSHAKE_BYTES = 64 * 1024;
/** How many abandoned (timed-out or aborted) ids are remembered to recognise late replies. */
const ABANDONED_IDS_KEPT = 1024;

export class QmpClient {
  readonly target: string;
  #targetSpec: QmpTarget;
  #connectTimeoutMs: number;
  #commandTimeoutMs: number;
  #logger: QmpLogger;
  #decoder: JsonLineDecoder;
  #events: EventHub;

  #state: QmpClientState = 'idle';
  #socket: Socket | undefined;
  #socketError: Error | undefined;
  #greeting!: QmpGreeting; // set by the handshake, before anyone holds the client
  #nextId = NEGOTIATION_ID + 1;
  #pending = new Map<number, PendingCommand>();
  #abandoned = new Map<number, string>();
  #disconnectError: QmpDisconnectedError | undefined;
  #disconnectListeners = new Set<(error: QmpDisconnectedError) => void>();
  #closed: Promise<void>;
  #markClosed!: () => void;

  private constructor(target: string, options: QmpClientOptions) {
    this.#targetSpec = parseTarget(target);
    this.target = describeTarget(this.#targetSpec);
    this.#connectTimeoutMs = options.connectTimeoutMs ?? 5000;
    this.#commandTimeoutMs = options.commandTimeoutMs ?? 30_000;
    this.#logger = options.logger ?? {};
    this.#decoder = new JsonLineDecoder({ maxLineBytes: options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES });
    this.#events = new EventHub((level, message, fields) => this.#log(level, message, fields));
    this.#closed = new Promise((resolve) => {
      this.#markClosed = resolve;
    });
  }

  /**
   * Connects to `target` (a unix socket path, `unix:PATH`, `HOST:PORT` or `tcp:HOST:PORT`),
   * reads the greeting and negotiates capabilities. Resolves with a running client, or rejects
   * with QmpConnectError and leaves no socket, timer or listener behind.
   */
  static async connect(target: string, options: QmpClientOptions = {}): Promise<QmpClient> {
    const client = new QmpClient(target, options);
    await client.#establish();
    return client;
  }

  get state(): QmpClientState {
    return this.#state;
  }

  /** QEMU's version and capabilities, from the greeting. */
  get greeting(): QmpGreeting {
    return this.#greeting;
  }

  /** Why the session ended; undefined while it runs. */
  get disconnectError(): QmpDisconnectedError | undefined {
    return this.#disconnectError;
  }

  /**
   * Runs a command from the table (commands.ts): arguments and result are typed, and the reply is
   * validated. Rejects with QmpCommandError (QEMU's error), QmpProtocolError (reply failing its
   * schema), QmpTimeoutError, or QmpDisconnectedError.
   */
  execute<N extends CommandName>(name: N, ...[args, options]: ExecuteRest<N>): Promise<CommandReturn<N>> {
    const spec: { returns: z.ZodType } = commands[name];
    return this.#send(name, args, options, spec.returns) as Promise<CommandReturn<N>>;
  }

  /** Runs any command without validating its reply. */
  executeRaw(name: string, args?: Record<string, unknown>, options?: ExecuteOptions): Promise<unknown> {
    return this.#send(name, args, options, undefined);
  }

  /** Calls `listener` for each event named `name` ('*': all). Returns the unsubscribe function. */
  on<N extends EventName>(name: N | '*', listener: EventListener<N>): () => void {
    return this.#events.on(name, listener);
  }

  /** Events from now on (filtered by name, names or predicate), buffered; ends on disconnect. */
  events(filter?: EventFilter, options?: { maxBuffered?: number }): AsyncIterableIterator<QmpEvent> {
    return this.#events.events(filter, options);
  }

  /** The next event `name` satisfying `predicate`; call before triggering it. */
  waitFor<N extends EventName>(
    name: N,
    predicate?: (event: QmpEvent<N>) => boolean,
    options?: WaitForOptions,
  ): Promise<QmpEvent<N>> {
    return this.#events.waitFor(name, predicate, options);
  }

  /** Calls `listener` once when the session ends (at once, asynchronously, if it has). */
  onDisconnect(listener: (error: QmpDisconnectedError) => void): () => void {
    const error = this.#disconnectError;
    if (error) {
      queueMicrotask(() => listener(error));
      return () => {};
    }
    this.#disconnectListeners.add(listener);
    return () => this.#disconnectListeners.delete(listener);
  }

  /**
   * Let the process exit while this session is open and idle (a harness's monitor; see
   * Vm.unref). While a command waits for its reply the socket holds the process, or an
   * `await execute(…)` with nothing else running would end it with the reply unread (exit 13).
   */
  unref(): void {
    this.#unrefWhenIdle = true;
    this.#updateRef();
  }

  #unrefWhenIdle = false;

  #updateRef(): void {
    if (!this.#unrefWhenIdle) return;
    if (this.#pending.size === 0) this.#socket?.unref();
    else this.#socket?.ref();
  }

  /** Ends the session: pending commands reject with QmpDisconnectedError. Idempotent. */
  async close(): Promise<void> {
    if (this.#state === 'running') this.#disconnect('closed-by-client');
    await this.#closed;
  }

  // ── handshake ────────────────────────────────────────────────────────────────────────────

  async #establish(): Promise<void> {
    this.#state = 'connecting';
    const timeoutMs = this.#connectTimeoutMs;
    const deadline = new AbortController();
    let phase: ConnectPhase = 'connect';
    const timer = setTimeout(() => deadline.abort(this.#connectTimeout(phase, timeoutMs)), timeoutMs);
    let socket: Socket | undefined;
    let reader: HandshakeReader | undefined;
    try {
      socket = await openTransport(this.#targetSpec, { signal: deadline.signal });
      reader = new HandshakeReader(socket, this.#decoder);
      phase = 'greeting';
      const watch = this.#watchForHolder(deadline);
      try {
        this.#greeting = await this.#readGreeting(reader, deadline.signal);
      } finally {
        watch.stop();
      }
      phase = 'capabilities';
      await this.#negotiate(socket, reader, deadline.signal);
      reader.release();
    } catch (err) {
      reader?.release();
      if (socket) {
        socket.on('error', () => {}); // nothing may surface as an uncaught 'error' after we gave up
        socket.destroy();
      }
      this.#state = 'disconnected';
      this.#markClosed();
      throw this.#asConnectError(err, phase);
    } finally {
      clearTimeout(timer);
    }
    this.#startReadLoop(socket);
  }

  /**
   * While the greeting is late, looks whether another client holds a unix monitor (seen twice,
   * HELD_CHECK_MS apart, so a client that is just leaving is not taken for one that stays):
   * then the handshake fails at once with reason 'busy' instead of waiting out the deadline.
   */
  #watchForHolder(deadline: AbortController): { stop(): void } {
    const target = this.#targetSpec;
    if (target.kind !== 'unix') return { stop: () => {} };
    let seen = 0;
    let stopped = false;
    let timer: NodeJS.Timeout | undefined;
    const check = async (): Promise<void> => {
      const held = await isMonitorHeld(target.path);
      if (stopped || deadline.signal.aborted) return; // the greeting came meanwhile: that connection is ours
      seen = held ? seen + 1 : 0;
      if (seen >= 2)
        deadline.abort(new QmpConnectError(this.target, 'busy', { details: { phase: 'greeting' } }));
      else timer = setTimeout(check, HELD_CHECK_MS);
    };
    timer = setTimeout(check, HELD_CHECK_MS);
    return {
      stop: () => {
        stopped = true;
        clearTimeout(timer);
      },
    };
  }

  async #readGreeting(reader: HandshakeReader, signal: AbortSignal): Promise<QmpGreeting> {
    const message = parseMessage(await reader.read(signal));
    if (message.kind !== 'greeting') {
      throw new QmpConnectError(this.target, 'not-qmp', {
        message: `${this.target} sent a ${message.kind} message instead of the QMP greeting`,
        details: { phase: 'greeting' },
      });
    }
    const { version, capabilities } = message.greeting.QMP;
    const { major, minor, micro } = version.qemu;
    this.#log('debug', 'QMP greeting', { major, minor, micro, capabilities });
    return { version: { major, minor, micro }, package: version.package, capabilities };
  }

  /** qmp_capabilities with no capabilities enabled: leaves negotiation mode. */
  async #negotiate(socket: Socket, reader: HandshakeReader, signal: AbortSignal): Promise<void> {
    socket.write(encodeMessage({ execute: 'qmp_capabilities', id: NEGOTIATION_ID }));
    for (;;) {
      const message = parseMessage(await reader.read(signal));
      if (message.kind === 'event') {
        // QEMU sends no events before negotiation completes (monitor/qmp.c); tolerate, but nobody
        // can be listening yet.
        this.#log('debug', `QMP event ${message.event.event} before negotiation dropped`);
        continue;
      }
      if ((message.kind === 'return' || message.kind === 'error') && message.id === NEGOTIATION_ID) {
        if (message.kind === 'return') return;
        throw new QmpConnectError(this.target, 'not-qmp', {
          message: `${this.target} refused qmp_capabilities: ${message.desc}`,
          cause: new QmpCommandError('qmp_capabilities', message.errorClass, message.desc),
          details: { phase: 'capabilities', errorClass: message.errorClass, desc: message.desc },
        });
      }
      throw new QmpConnectError(this.target, 'not-qmp', {
        message: `${this.target} answered qmp_capabilities with an unexpected ${message.kind} message`,
        details: { phase: 'capabilities' },
      });
    }
  }

  #connectTimeout(phase: ConnectPhase, timeoutMs: number): QmpConnectError {
    if (phase === 'greeting') {
      return new QmpConnectError(this.target, 'not-qmp', {
        message: `no QMP greeting from ${this.target} within ${timeoutMs} ms`,
        details: { phase, timeoutMs },
      });
    }
    return new QmpConnectError(this.target, 'timeout', {
      message: `timed out after ${timeoutMs} ms connecting to QMP at ${this.target} (${phase})`,
      details: { phase, timeoutMs },
    });
  }

  #asConnectError(err: unknown, phase: ConnectPhase): QmpConnectError {
    if (err instanceof QmpConnectError) return err;
    if (err instanceof HandshakeClosed) {
      return new QmpConnectError(this.target, 'not-qmp', {
        message: `${this.target} closed the connection during the QMP handshake (${phase})`,
        cause: err.cause,
        details: { phase },
      });
    }
    // A protocol error (not JSON, not a QMP message, too long) or anything unforeseen.
    return new QmpConnectError(this.target, 'not-qmp', {
      message:
        err instanceof QmpError
          ? `${this.target} does not speak QMP: ${err.message}`
          : `${this.target} did not complete a QMP handshake`,
      cause: err,
      details: { phase },
    });
  }

  // ── the read loop ────────────────────────────────────────────────────────────────────────

  #startReadLoop(socket: Socket): void {
    this.#socket = socket;
    this.#state = 'running';
    socket.on('error', (err) => {
      this.#socketError ??= err; // 'close' follows and ends the session
    });
    socket.on('close', () => this.#onClose());
    socket.on('data', (chunk: Buffer) => this.#pump(chunk));
    socket.resume();
    this.#pump(undefined); // messages that arrived with the handshake's last chunk
    if (socket.closed) this.#onClose(); // the peer hung up right after negotiating
  }

  #pump(chunk: Buffer | undefined): void {
    if (this.#state !== 'running') return;
    try {
      if (chunk) this.#decoder.push(chunk);
      for (;;) {
        if (this.#state !== 'running') return;
        const value = this.#decoder.tryNext();
        if (value === undefined) return;
        this.#onMessage(value);
      }
    } catch (err) {
      this.#disconnect('protocol-error', err);
    }
  }

  /** The one place every message from QEMU is routed. Throws only for fatal protocol errors. */
  #onMessage(value: unknown): void {
    const message = parseMessage(value);
    switch (message.kind) {
      case 'event':
        this.#events.emit(message.event);
        return;
      case 'greeting':
        throw new QmpProtocolError('unexpected-message', 'QMP peer sent a greeting in mid-session');
      case 'return':
      case 'error': {
        if (message.id === undefined) throw idLessReply(message);
        const pending = typeof message.id === 'number' ? this.#pending.get(message.id) : undefined;
        if (pending === undefined) {
          this.#dropReply(message.id);
          return;
        }
        this.#pending.delete(message.id as number);
        this.#updateRef();
        pending.settle(message);
        return;
      }
    }
  }

  #dropReply(id: unknown): void {
    const abandoned = typeof id === 'number' ? this.#abandoned.get(id) : undefined;
    if (abandoned !== undefined) {
      this.#abandoned.delete(id as number);
      this.#log('debug', `late reply to ${abandoned} dropped`, { id });
    } else {
      this.#log('warn', 'QMP reply with an unknown id dropped', { id });
    }
  }

  #onClose(): void {
    if (this.#state === 'running') {
      let reason: DisconnectReason = 'peer-closed';
      let cause: unknown = this.#socketError;
      if (cause) {
        // QEMU exiting (quit, crash, kill) often resets the socket rather than closing it cleanly.
        const errno = (cause as NodeJS.ErrnoException).code;
        if (errno !== 'ECONNRESET' && errno !== 'EPIPE') reason = 'socket-error';
      } else {
        try {
          this.#decoder.end();
        } catch (err) {
          reason = 'protocol-error';
          cause = err;
        }
      }
      this.#disconnect(reason, cause);
    }
    this.#state = 'disconnected';
    this.#markClosed();
  }

  /** Ends a running session: every pending command rejects with the same error. */
  #disconnect(reason: DisconnectReason, cause?: unknown): void {
    if (this.#state !== 'running') return;
    this.#state = 'disconnecting';
    const error = new QmpDisconnectedError(this.target, reason, cause);
    this.#disconnectError = error;
    this.#log(reason === 'closed-by-client' ? 'debug' : 'warn', error.message, { reason, cause });
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const command of pending) command.fail(error);
    this.#events.end(error);
    for (const listener of [...this.#disconnectListeners]) {
      try {
        listener(error);
      } catch (err) {
        this.#log('error', 'QMP disconnect listener threw', { error: err });
      }
    }
    this.#disconnectListeners.clear();
    this.#socket?.destroy(); // 'close' follows (or already fired) and moves us to disconnected
  }

  // ── commands ─────────────────────────────────────────────────────────────────────────────

  #send(
    command: string,
    args: Record<string, unknown> | undefined,
    options: ExecuteOptions = {},
    schema: z.ZodType | undefined,
  ): Promise<unknown> {
    const socket = this.#socket;
    if (this.#state !== 'running' || socket === undefined) return Promise.reject(this.#notRunningError());
    const { signal } = options;
    if (signal?.aborted) return Promise.reject(signal.reason);
    const timeoutMs = options.timeoutMs ?? this.#commandTimeoutMs;
    const id = this.#nextId++;

    return new Promise<unknown>((resolve, reject) => {
      const pending: PendingCommand = {
        command,
        settle: (reply) => {
          stopTimers();
          const outcome = this.#replyOutcome(command, reply, schema);
          if (outcome.ok) resolve(outcome.value);
          else reject(outcome.error);
        },
        fail: (error) => {
          stopTimers();
          reject(error);
        },
      };
      this.#pending.set(id, pending);
      this.#updateRef();
      const stopTimers = onTimeoutOrAbort(command, timeoutMs, signal, (error) => {
        // Stop waiting; a reply that still comes is dropped as late.
        if (!this.#abandon(id, pending)) return;
        stopTimers();
        reject(error);
      });
      socket.write(encodeMessage(executeMessage(command, args, id))); // a failed write surfaces as 'error' then 'close'
    });
  }

  /** Why a command cannot be sent: the session has ended. */
  #notRunningError(): QmpDisconnectedError {
    return this.#disconnectError ?? new QmpDisconnectedError(this.target, 'closed-by-client');
  }

  /** QEMU's answer as the command's value, or as QmpCommandError, or QmpProtocolError when it fails `schema`. */
  #replyOutcome(
    command: string,
    reply: ReplyMessage,
    schema: z.ZodType | undefined,
  ): { ok: true; value: unknown } | { ok: false; error: QmpError } {
    if (reply.kind === 'error') {
      return { ok: false, error: new QmpCommandError(command, reply.errorClass, reply.desc) };
    }
    if (schema === undefined) return { ok: true, value: reply.value };
    const parsed = schema.safeParse(reply.value);
    if (parsed.success) return { ok: true, value: parsed.data };
    const issues = summarizeIssues(parsed.error.issues);
    this.#log('warn', `reply to ${command} failed its schema`, { issues });
    const error = new QmpProtocolError(
      'bad-reply',
      `reply to ${command} does not match its schema: ${issues}`,
      {
        command,
        details: { issues },
      },
    );
    return { ok: false, error };
  }

  /**
   * Forgets command `id` if `pending` still waits for it, and remembers the id so that a late
   * reply is recognised; false when the command has settled already.
   */
  #abandon(id: number, pending: PendingCommand): boolean {
    if (this.#pending.get(id) !== pending) return false;
    this.#pending.delete(id);
    this.#updateRef();
    this.#abandoned.set(id, pending.command);
    if (this.#abandoned.size > ABANDONED_IDS_KEPT) {
      this.#abandoned.delete(this.#abandoned.keys().next().value as number);
    }
    return true;
  }

  #log(level: 'debug' | 'warn' | 'error', message: string, fields?: Record<string, unknown>): void {
    this.#logger[level]?.(message, { target: this.target, ...fields });
  }
}

function idLessReply(message: ReplyMessage): QmpProtocolError {
  // QEMU answers without an id only when it could not parse the request (monitor/qmp.c,
  // handle_qmp_command): no pending command can own it, so the session cannot be trusted.
  if (message.kind === 'error') {
    return new QmpProtocolError(
      'id-less-reply',
      `QEMU rejected a request it could not parse: ${message.desc}`,
      {
        details: { errorClass: message.errorClass, desc: message.desc },
      },
    );
  }
  return new QmpProtocolError('id-less-reply', 'QMP peer sent a reply without an id');
}

/** `arguments` is left out when there are none. */
function executeMessage(command: string, args: Record<string, unknown> | undefined, id: number) {
  return args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
}

/**
 * Calls `onStop` with a QmpTimeoutError once `timeoutMs` has passed, and with the abort reason if
 * `signal` aborts, until the function it returns cancels both.
 */
function onTimeoutOrAbort(
  command: string,
  timeoutMs: number,
  signal: AbortSignal | undefined,
  onStop: (error: unknown) => void,
): () => void {
  const timer = isTimerDelay(timeoutMs)
    ? setTimeout(() => onStop(new QmpTimeoutError({ command }, timeoutMs)), timeoutMs)
    : undefined;
  const onAbort = () => onStop(signal?.reason);
  signal?.addEventListener('abort', onAbort, { once: true });
  return () => {
    if (timer) clearTimeout(timer);
    signal?.removeEventListener('abort', onAbort);
  };
}

/** The connection ended (or failed) before the handshake finished. */
class HandshakeClosed extends Error {}

/**
 * Whole messages from a paused socket, for the handshake only: 'readable' + read(), so nothing
 * is consumed that the read loop would miss. `release` detaches before the loop takes over.
 */
class HandshakeReader {
  readonly #socket: Socket;
  readonly #decoder: JsonLineDecoder;
  #ended = false;
  #error: Error | undefined;
  #wake: (() => void) | undefined;
  readonly #onReadable = () => this.#wakeUp();
  readonly #onEnd = () => {
    this.#ended = true;
    this.#wakeUp();
  };
  readonly #onError = (err: Error) => {
    this.#error ??= err;
    this.#wakeUp();
  };

  constructor(socket: Socket, decoder: JsonLineDecoder) {
    this.#socket = socket;
    this.#decoder = decoder;
    socket.on('readable', this.#onReadable);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    socket.on('error', this.#onError);
  }

  async read(signal: AbortSignal): Promise<unknown> {
    for (;;) {
      const value = this.#decoder.tryNext();
      if (value !== undefined) return value;
      const chunk = this.#socket.read() as Buffer | null;
      if (chunk !== null) {
        this.#decoder.push(chunk);
        if (this.#decoder.bufferedBytes > MAX_HANDSHAKE_BYTES) {
          throw new QmpProtocolError(
            'line-too-long',
            `no QMP message in the first ${MAX_HANDSHAKE_BYTES} bytes`,
          );
        }
        continue;
      }
      if (this.#error) throw new HandshakeClosed(this.#error.message, { cause: this.#error });
      if (this.#ended) throw new HandshakeClosed('connection closed during the QMP handshake');
      await this.#readable(signal);
    }
  }

  release(): void {
    this.#socket.off('readable', this.#onReadable);
    this.#socket.off('end', this.#onEnd);
    this.#socket.off('close', this.#onEnd);
    this.#socket.off('error', this.#onError);
    this.#wakeUp();
  }

  #readable(signal: AbortSignal): Promise<void> {
    signal.throwIfAborted();
    return new Promise<void>((resolve, reject) => {
      const onAbort = () => {
        this.#wake = undefined;
        reject(signal.reason);
      };
      this.#wake = () => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      };
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  #wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }
}
