/**
 * Event delivery: listeners by name or '*', a buffered async iterator, and `waitFor`.
 *
 * The client hands every event message to `emit` (from its one routing place) and calls `end`
 * once when the session ends: iterators finish, waiters reject with the disconnect error.
 * Known events (QEMU 7.2, qapi/*.json) get typed `data`; others carry their raw `data` object.
 */
import { z } from 'zod';
import { QmpEventOverflowError, QmpTimeoutError, summarizeIssues } from './errors.js';
import { type QmpEventMessage, timestampToUs } from './message.js';
import { jobStatusSchema, jobTypeSchema, migrationStatusSchema, shutdownCauseSchema } from './qapi.js';

const int = z.number();
const empty = z.looseObject({});
const blockJobBase = z.looseObject({
  type: jobTypeSchema,
  device: z.string(), // for jobs started with a job-id, this is the job id
  len: int,
  offset: int,
  speed: int,
});

export const eventDataSchemas = {
  // qapi/run-state.json
  STOP: empty,
  RESUME: empty,
  POWERDOWN: empty,
  SUSPEND: empty,
  WAKEUP: empty,
  SHUTDOWN: z.looseObject({ guest: z.boolean(), reason: shutdownCauseSchema }),
  RESET: z.looseObject({ guest: z.boolean(), reason: shutdownCauseSchema }),
  // qapi/migration.json (MIGRATION needs the "events" capability)
  MIGRATION: z.looseObject({ status: migrationStatusSchema }),
  MIGRATION_PASS: z.looseObject({ pass: int }),
  // qapi/job.json, qapi/block-core.json
  JOB_STATUS_CHANGE: z.looseObject({ id: z.string(), status: jobStatusSchema }),
  BLOCK_JOB_READY: blockJobBase,
  BLOCK_JOB_COMPLETED: blockJobBase.extend({ error: z.string().optional() }),
  BLOCK_JOB_CANCELLED: blockJobBase,
  BLOCK_JOB_PENDING: z.looseObject({ type: jobTypeSchema, id: z.string() }),
  BLOCK_JOB_ERROR: z.looseObject({ device: z.string(), operation: z.string(), action: z.string() }),
  BLOCK_IO_ERROR: z.looseObject({
    device: z.string(),
    'node-name': z.string().optional(),
    operation: z.string(),
    action: z.string(),
    nospace: z.boolean().optional(),
    reason: z.string(),
  }),
} as const;

export type KnownEventName = keyof typeof eventDataSchemas;
/** An event name: the known ones autocomplete, any other string is accepted. */
export type EventName = KnownEventName | (string & {});

export type EventData<N extends string> = N extends KnownEventName
  ? z.output<(typeof eventDataSchemas)[N]>
  : Record<string, unknown>;

export interface QmpEvent<N extends string = string> {
  event: N;
  /** The event's data; `{}` when QEMU sent none. */
  data: EventData<N>;
  /** QEMU's wall-clock time of the event, as sent. */
  timestamp: { seconds: number; microseconds: number };
  /** The same instant in microseconds since the epoch. */
  timestampUs: number;
}

export type EventListener<N extends string = string> = (event: QmpEvent<N>) => void;
export type EventFilter = string | readonly string[] | ((event: QmpEvent) => boolean);

export interface WaitForOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

export type HubLog = (
  level: 'debug' | 'warn' | 'error',
  message: string,
  fields?: Record<string, unknown>,
) => void;

/** Events an iterator may hold unread before it fails with QSNAP_QMP_EVENT_OVERFLOW. */
export const DEFAULT_MAX_BUFFERED_EVENTS = 10_000;

export class EventHub {
  #listeners = new Map<string, Set<EventListener>>();
  #onEnd = new Set<(error: Error) => void>();
  #endError: Error | undefined;
  readonly #log: HubLog;

  constructor(log: HubLog = () => {}) {
    this.#log = log;
  }

  /** True once `end` was called. */
  get ended(): boolean {
    return this.#endError !== undefined;
  }

  /**
   * Delivers one event message. A known event whose data fails its schema is logged and dropped:
   * it has no caller to reject, and tearing down a session mid-snapshot over it would be worse.
   */
  emit(message: QmpEventMessage): void {
    if (this.#endError) return;
    const event = toEvent(message, this.#log);
    if (event === undefined) return;
    for (const key of [event.event, '*']) {
      const set = this.#listeners.get(key);
      if (!set) continue;
      for (const listener of [...set]) {
        try {
          listener(event);
        } catch (err) {
          this.#log('error', `QMP event listener for ${key} threw`, { event: event.event, error: err });
        }
      }
    }
  }

  /** Calls `listener` for each event named `name` ('*': every event). Returns the unsubscribe. */
  on<N extends EventName>(name: N | '*', listener: EventListener<N>): () => void {
    let set = this.#listeners.get(name);
    if (!set) {
      set = new Set();
      this.#listeners.set(name, set);
    }
    const l = listener as EventListener;
    set.add(l);
    return () => {
      set.delete(l);
      if (set.size === 0 && this.#listeners.get(name) === set) this.#listeners.delete(name);
    };
  }

  /**
   * The events that pass `filter` (a name, names, or a predicate), from now on, buffered until
   * read. Finishes when the session ends; throws QmpEventOverflowError (after the buffered events)
   * if more than `maxBuffered` are left unread.
   */
  events(filter?: EventFilter, options: { maxBuffered?: number } = {}): AsyncIterableIterator<QmpEvent> {
    const matches = toPredicate(filter);
    const buffer = new EventBuffer(options.maxBuffered ?? DEFAULT_MAX_BUFFERED_EVENTS, () => {
      unsubscribe();
      this.#onEnd.delete(onEnd);
    });
    const unsubscribe = this.on('*', (event) => {
      if (matches(event)) buffer.push(event);
    });
    const onEnd = () => buffer.finish();
    this.#onEnd.add(onEnd);
    if (this.ended) buffer.finish();

    const iterator: AsyncIterableIterator<QmpEvent> = {
      next: () => buffer.next(),
      return: () => buffer.return(),
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /**
   * The next event named `name` for which `predicate` holds. Subscribe before you trigger it:
   * `const stopped = waitFor('STOP'); await execute('stop'); await stopped`.
   * Rejects with QmpTimeoutError after `timeoutMs`, with `signal.reason` on abort, and with the
   * disconnect error when the session ends.
   */
  waitFor<N extends EventName>(
    name: N,
    predicate?: (event: QmpEvent<N>) => boolean,
    options: WaitForOptions = {},
  ): Promise<QmpEvent<N>> {
    const { timeoutMs, signal } = options;
    return new Promise<QmpEvent<N>>((resolve, reject) => {
      if (this.#endError) return reject(this.#endError);
      if (signal?.aborted) return reject(signal.reason);
      let timer: NodeJS.Timeout | undefined;
      const settle = (fn: () => void) => {
        unsubscribe();
        if (timer) clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.#onEnd.delete(onEnd);
        fn();
      };
      const unsubscribe = this.on<N>(name, (event) => {
        let ok: boolean;
        try {
          ok = predicate ? predicate(event) : true;
        } catch (err) {
          settle(() => reject(err));
          return;
        }
        if (ok) settle(() => resolve(event));
      });
      const onAbort = () => settle(() => reject(signal?.reason));
      const onEnd = (error: Error) => settle(() => reject(error));
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#onEnd.add(onEnd);
      if (timeoutMs !== undefined && isTimerDelay(timeoutMs)) {
        timer = setTimeout(
          () => settle(() => reject(new QmpTimeoutError({ event: name }, timeoutMs))),
          timeoutMs,
        );
      }
    });
  }

  /** Ends delivery for good: iterators finish, waiters reject with `error`. Idempotent. */
  end(error: Error): void {
    if (this.#endError) return;
    this.#endError = error;
    for (const onEnd of [...this.#onEnd]) onEnd(error);
    this.#onEnd.clear();
    this.#listeners.clear();
  }
}

/**
 * The state behind one events() iterator: events not read yet, at most one next() waiting, and
 * how it ended. `onFinish` detaches it from the hub.
 */
class EventBuffer {
  readonly #queue: QmpEvent[] = [];
  readonly #maxBuffered: number;
  readonly #onFinish: () => void;
  #failure: Error | undefined;
  #finished = false;
  #waiter: { resolve: (r: IteratorResult<QmpEvent>) => void; reject: (e: Error) => void } | undefined;

  constructor(maxBuffered: number, onFinish: () => void) {
    this.#maxBuffered = maxBuffered;
    this.#onFinish = onFinish;
  }

  /** An event that passed the filter: to the waiting next(), else queued; a full queue fails. */
  push(event: QmpEvent): void {
    if (this.#waiter) {
      const w = this.#waiter;
      this.#waiter = undefined;
      w.resolve({ done: false, value: event });
    } else if (this.#queue.length >= this.#maxBuffered) {
      this.#failure = new QmpEventOverflowError(this.#maxBuffered);
      this.finish();
    } else {
      this.#queue.push(event);
    }
  }

  /** No more events: detaches, and settles a waiting next() with the failure or done. Idempotent. */
  finish(): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#onFinish();
    const w = this.#waiter;
    this.#waiter = undefined;
    if (w && this.#failure) w.reject(this.#failure);
    else if (w) w.resolve({ done: true, value: undefined });
  }

  next(): Promise<IteratorResult<QmpEvent>> {
    const event = this.#queue.shift();
    if (event) return Promise.resolve({ done: false, value: event });
    if (this.#failure) {
      const f = this.#failure;
      this.#failure = undefined;
      return Promise.reject(f);
    }
    if (this.#finished) return Promise.resolve({ done: true, value: undefined });
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
    });
  }

  return(): Promise<IteratorResult<QmpEvent>> {
    this.#queue.length = 0;
    this.#failure = undefined;
    this.finish();
    return Promise.resolve({ done: true, value: undefined });
  }
}

/** setTimeout fires at once for delays it cannot represent (Infinity, > 2^31-1 ms). */
export function isTimerDelay(ms: number): boolean {
  return Number.isFinite(ms) && ms >= 0 && ms <= 0x7fffffff;
}

function toEvent(message: QmpEventMessage, log: HubLog): QmpEvent | undefined {
  const raw = message.data ?? {};
  const schema = (eventDataSchemas as Record<string, z.ZodType>)[message.event];
  let data: Record<string, unknown> = raw;
  if (schema) {
    const parsed = schema.safeParse(raw);
    if (!parsed.success) {
      log('warn', `dropped QMP event ${message.event}: data does not match its schema`, {
        event: message.event,
        issues: summarizeIssues(parsed.error.issues),
      });
      return undefined;
    }
    data = parsed.data as Record<string, unknown>;
  }
  const timestamp = { seconds: message.timestamp.seconds, microseconds: message.timestamp.microseconds };
  return { event: message.event, data, timestamp, timestampUs: timestampToUs(timestamp) };
}

function toPredicate(filter: EventFilter | undefined): (event: QmpEvent) => boolean {
  if (filter === undefined) return () => true;
  if (typeof filter === 'function') return filter;
  if (typeof filter === 'string') return (e) => filter === '*' || e.event === filter;
  const names = new Set(filter);
  return (e) => names.has(e.event);
}
