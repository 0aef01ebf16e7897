import WebSocket from 'ws';
import { DaemonError } from '../daemon/errors.js';
import { type ArgsOf, type Event, type OpName, PROTOCOL_VERSION, ServerFrame } from '../daemon/protocol.js';
import { readToken, tokenPath } from '../daemon/token.js';
import { errorFromJson } from '../daemon/worker-host.js';
import { defaultStateDir } from '../engine/state-dir.js';
import type { QsnapError } from '../errors.js';

export interface ConnectOptions {
  /** The token (default: read from `<stateDir>/daemon.token`, checked to be 0600). */
  token?: string;
  /** Where the token file is (default: $QSNAP_STATE_DIR, else $XDG_STATE_HOME/qsnap). */
  stateDir?: string;
  /** Called with every event this connection receives (also available from `events()`). */
  onEvent?: (event: Event) => void;
  timeoutMs?: number;
}

export type Result = Record<string, unknown>;

/** A typed client of the daemon: one method per op, and an async iterator of events. */
export interface DaemonClient {
  request<O extends OpName>(op: O, args: ArgsOf<O>, onEvent?: (event: Event) => void): Promise<Result>;
  attach(args: ArgsOf<'attach'>): Promise<Result & { vm: string; state: string }>;
  detach(args: ArgsOf<'detach'>): Promise<Result>;
  launch(args: ArgsOf<'launch'>): Promise<Result & { vm: string }>;
  vms(args?: ArgsOf<'vms'>): Promise<{ vms: Result[]; daemon: Result }>;
  status(args: ArgsOf<'status'>): Promise<Result & { state: string }>;
  snapshot(
    args: ArgsOf<'snapshot'>,
    onEvent?: (event: Event) => void,
  ): Promise<Result & { name: string; downtimeMs: number }>;
  restore(args: ArgsOf<'restore'>, onEvent?: (event: Event) => void): Promise<Result & { vm: string }>;
  revert(args: ArgsOf<'revert'>, onEvent?: (event: Event) => void): Promise<Result & { vm: string }>;
  list(): Promise<{ snapshots: (Result & { name: string })[] }>;
  inspect(args: ArgsOf<'inspect'>): Promise<Result>;
  verify(args: ArgsOf<'verify'>, onEvent?: (event: Event) => void): Promise<Result>;
  delete(args: ArgsOf<'delete'>): Promise<Result>;
  gc(args?: ArgsOf<'gc'>): Promise<Result>;
  cancel(args: ArgsOf<'cancel'>): Promise<Result>;
  subscribe(args?: ArgsOf<'subscribe'>): Promise<Result>;
  result(args: ArgsOf<'result'>): Promise<Result>;
  /** Every event from now on, until the connection closes. */
  events(): AsyncIterableIterator<Event>;
  close(): Promise<void>;
}

/**
 * Connect to `qsnap serve` (ws://127.0.0.1:PORT/v1, or ws+unix:///path.sock:/v1). Every frame
 * received is checked against the protocol; an error reply rejects with a QsnapError of the
 * same code as the CLI's.
 */
export async function connect(url: string, options: ConnectOptions = {}): Promise<DaemonClient> {
  const token = options.token ?? (await readToken(tokenPath(options.stateDir ?? defaultStateDir())));
  const ws = new WebSocket(url, {
    headers: { Authorization: `Bearer ${token}` },
    handshakeTimeout: options.timeoutMs ?? 5000,
    perMessageDeflate: false,
  });
  await new Promise<void>((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('unexpected-response', (_req, res) => {
      reject(
        new DaemonError(
          'QSNAP_DAEMON_CONNECT',
          `the daemon at ${url} refused the connection (HTTP ${res.statusCode})`,
          {
            hint:
              res.statusCode === 401
                ? 'the token is wrong: read it from $XDG_STATE_HOME/qsnap/daemon.token'
                : 'see the daemon log',
            details: { status: res.statusCode },
          },
        ),
      );
      res.resume();
    });
    ws.once('error', (err) =>
      reject(
        new DaemonError('QSNAP_DAEMON_CONNECT', `cannot reach the daemon at ${url}: ${err.message}`, {
          hint: 'start it with qsnap serve (or check --daemon / QSNAP_DAEMON)',
          cause: err,
        }),
      ),
    );
  });
  let seq = 0;
  const pending = new Map<
    string,
    { resolve(r: Result): void; reject(e: QsnapError): void; onEvent?: (e: Event) => void }
  >();
  const listeners = new Set<(e: Event | undefined) => void>();
  ws.on('message', (data) => {
    const frame = ServerFrame.safeParse(JSON.parse(data.toString()));
    if (!frame.success) return;
    const f = frame.data;
    if ('event' in f) {
      if (f.id !== undefined) pending.get(f.id)?.onEvent?.(f);
      options.onEvent?.(f);
      for (const l of listeners) l(f);
      return;
    }
    const p = f.id === null ? undefined : pending.get(f.id);
    if (!p) return;
    pending.delete(f.id!);
    if (f.ok) p.resolve(f.result);
    else p.reject(errorFromJson(f.error));
  });
  ws.on('close', (code, reason) => {
    const err = new DaemonError(
      'QSNAP_DAEMON_DISCONNECTED',
      `the connection to the daemon closed (${code} ${reason.toString()})`,
      {
        hint: 'the operations go on in the daemon: reconnect and ask for their result by op id',
      },
    );
    for (const p of pending.values()) p.reject(err);
    pending.clear();
    for (const l of listeners) l(undefined);
  });

  const request = <O extends OpName>(op: O, args: ArgsOf<O>, onEvent?: (e: Event) => void): Promise<Result> =>
    new Promise<Result>((resolve, reject) => {
      const id = String(++seq);
      pending.set(id, { resolve, reject, ...(onEvent ? { onEvent } : {}) });
      ws.send(JSON.stringify({ v: PROTOCOL_VERSION, id, op, args }), (err) => {
        if (err) {
          pending.delete(id);
          reject(new DaemonError('QSNAP_DAEMON_DISCONNECTED', `cannot send to the daemon: ${err.message}`));
        }
      });
    });

  function events(): AsyncIterableIterator<Event> {
    const queue: (Event | undefined)[] = [];
    let wake: (() => void) | undefined;
    const listener = (e: Event | undefined) => {
      queue.push(e);
      wake?.();
    };
    listeners.add(listener);
    const iterator: AsyncIterableIterator<Event> = {
      [Symbol.asyncIterator]: () => iterator,
      next: async () => {
        while (queue.length === 0)
          await new Promise<void>((r) => {
            wake = r;
          });
        const e = queue.shift();
        if (e === undefined) {
          listeners.delete(listener);
          return { done: true, value: undefined };
        }
        return { done: false, value: e };
      },
      return: async () => {
        listeners.delete(listener);
        return { done: true, value: undefined };
      },
    };
    return iterator;
  }

  const typed =
    <T>(op: OpName) =>
    (args: never, onEvent?: (e: Event) => void) =>
      request(op, (args ?? {}) as never, onEvent) as Promise<T>;
  return {
    request,
    attach: typed('attach'),
    detach: typed('detach'),
    launch: typed('launch'),
    vms: (args = {}) => request('vms', args) as Promise<{ vms: Result[]; daemon: Result }>,
    status: typed('status'),
    snapshot: typed('snapshot'),
    restore: typed('restore'),
    revert: typed('revert'),
    list: () => request('list', {}) as Promise<{ snapshots: (Result & { name: string })[] }>,
    inspect: typed('inspect'),
    verify: typed('verify'),
    delete: typed('delete'),
    gc: typed('gc'),
    cancel: typed('cancel'),
    subscribe: typed('subscribe'),
    result: typed('result'),
    events,
    close: () =>
      new Promise<void>((resolve) => {
        if (ws.readyState === ws.CLOSED) return resolve();
        ws.once('close', () => resolve());
        ws.close(1000);
      }),
  };
}
