/**
 * Host side of the test guest's serial console: the line protocol of the qsnap workload
 * (images/workload/workload.c), over the unix socket of a QEMU serial chardev
 * (`-chardev socket,id=serial0,path=P,server=on,wait=off -serial chardev:serial0`).
 *
 * Guest → host, one line each (decimal numbers; the run id in hex):
 *   QSNAP-WORKLOAD READY run=<hex> mem_mib=<n> pages=<N> disk=<dev|none> slots=<n>
 *   QSNAP-HB n=<k> epoch=<e> page=<j> rec=<A> mem_mibps=<r> disk_iops=<r> bad=<latched failures>
 *   QSNAP-CHECK OK token=<t> epoch=<e> page=<j> rec=<A> pages=<N> slots=<n> ms=<t>
 *   QSNAP-CHECK FAIL token=<t> reason=<r> <detail k=v…> at=check|write failures=<n> latched=<n> ms=<t>
 *   QSNAP-HELD token=<t> epoch=<e> page=<j> rec=<A>
 *   QSNAP-RELEASED token=<t>
 *   QSNAP-CORRUPTED token=<t> kind=<k> <page=… | slot=… seq=…>
 *   QSNAP-ERROR token=<t> unknown-command|hold-timeout|not-applicable
 *   QSNAP-FATAL <message>                         (the workload exits; the kernel panics)
 * Host → guest: `check|hold|release <token>`, `corrupt-mem|corrupt-disk <token> <kind>`.
 *
 * Replies carry the request's token, so old lines on the console never answer a new call.
 * QEMU drops serial output while no client is connected: a client that connects late, or
 * to a restored guest, sees no READY line, only heartbeats.
 *
 * Errors: guest/errors.ts.
 */
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { GuestConsoleError, GuestProtocolError, GuestTimeoutError } from './errors.js';

export interface WaitOptions {
  timeoutMs?: number;
}

/** The READY line's fields. */
export interface GuestReady {
  kind: 'ready';
  runId: string;
  memMib: number;
  pages: number;
  /** The raw disk the record ring is on, or null when the guest runs memory only. */
  disk: string | null;
  slots: number;
  line: string;
}

export interface GuestHeartbeat {
  kind: 'heartbeat';
  n: number;
  epoch: number;
  page: number;
  rec: number;
  memMibps: number;
  diskIops: number;
  /** Failures the writers found before overwriting them (the line's `bad=`); 0 on a sound run. */
  latchedFailures: number;
  line: string;
}

export interface GuestProgress {
  epoch: number;
  page: number;
  rec: number;
}

export interface GuestCheck {
  ok: boolean;
  /**
   * Why it failed: mem-epoch, mem-pattern, mem-header, disk-missing, disk-stale, disk-future,
   * disk-nonce, disk-pattern, disk-slot, disk-io. `fields.at` says who found it first: the
   * check itself, or a writer about to overwrite it (`write`, latched for the whole run).
   */
  reason?: string;
  /** Every key=value of the line, e.g. page, want, got, failures, latched, ms. */
  fields: Record<string, string>;
  line: string;
}

const DEFAULT_TIMEOUT_MS = 30_000;
const READY_TIMEOUT_MS = 120_000;
const CONNECT_RETRY_MS = 50;
const MAX_PARTIAL_LINE = 64 * 1024;
const RECENT_LINES = 64;

interface Waiter {
  regex: RegExp;
  resolve: (line: string) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export class GuestConsole {
  private state: 'open' | 'closed' = 'open';
  private partial = '';
  private closeCause: unknown;
  private readonly recent: string[] = [];
  private readonly waiters = new Set<Waiter>();
  private readonly listeners = new Set<(line: string) => void>();
  private readonly closed: Promise<void>;

  private constructor(
    private readonly socket: net.Socket,
    readonly socketPath: string,
  ) {
    socket.setEncoding('latin1'); // console bytes, including firmware escape codes
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err) => {
      this.closeCause ??= err;
    });
    this.closed = new Promise((resolve) => {
      socket.once('close', () => {
        this.onClose();
        resolve();
      });
    });
  }

  /**
   * Connects to the chardev socket, retrying while QEMU has not created it yet or does not
   * listen yet (it may still be starting).
   */
  static async connect(socketPath: string, options: WaitOptions = {}): Promise<GuestConsole> {
    const timeoutMs = options.timeoutMs ?? 10_000;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        return new GuestConsole(await openSocket(socketPath, deadline - Date.now()), socketPath);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        const waiting = code === 'ENOENT' || code === 'ECONNREFUSED' || code === 'ETIMEDOUT';
        if (!waiting) {
          throw new GuestConsoleError(`cannot connect to the guest console at ${socketPath}`, {
            cause: err,
            details: { socketPath },
          });
        }
        if (Date.now() + CONNECT_RETRY_MS >= deadline) {
          throw new GuestTimeoutError(`no guest console at ${socketPath} within ${timeoutMs} ms`, {
            cause: err,
            details: { socketPath, timeoutMs },
          });
        }
        await sleep(CONNECT_RETRY_MS);
      }
    }
  }

  /** Calls `listener` with every console line (from `QSNAP-` on, when the line has it). */
  onLine(listener: (line: string) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** The next line that matches `regex` (lines that arrived before this call do not count). */
  waitForLine(regex: RegExp, options: WaitOptions = {}): Promise<string> {
    this.assertOpen();
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        regex,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters.delete(waiter);
          reject(
            new GuestTimeoutError(`no console line matching ${regex} within ${timeoutMs} ms`, {
              details: { pattern: regex.source, timeoutMs, socketPath: this.socketPath },
            }),
          );
        }, timeoutMs),
      };
      this.waiters.add(waiter);
    });
  }

  /**
   * Resolves once the workload runs: with its READY line, or — when READY went out before
   * this client connected, or the guest was restored — with a heartbeat.
   */
  async waitReady(options: WaitOptions = {}): Promise<GuestReady | GuestHeartbeat> {
    const seen =
      this.recent.find((l) => l.startsWith('QSNAP-WORKLOAD READY ')) ??
      this.recent.findLast((l) => l.startsWith('QSNAP-HB '));
    const line =
      seen ??
      (await this.waitForLine(/^QSNAP-(WORKLOAD READY|HB) /, {
        timeoutMs: options.timeoutMs ?? READY_TIMEOUT_MS,
      }));
    return line.startsWith('QSNAP-HB ') ? parseHeartbeat(line) : parseReady(line);
  }

  nextHeartbeat(options: WaitOptions = {}): Promise<GuestHeartbeat> {
    return this.waitForLine(/^QSNAP-HB /, options).then(parseHeartbeat);
  }

  /** Holds both writers at their safe points, verifies everything, and resumes them (unless held). */
  async check(options: WaitOptions = {}): Promise<GuestCheck> {
    const line = await this.request('check', [], /^QSNAP-CHECK (OK|FAIL) /, options);
    const fields = parseFields(line);
    const ok = line.startsWith('QSNAP-CHECK OK ');
    return ok ? { ok, fields, line } : { ok, reason: fields['reason'] ?? 'unknown', fields, line };
  }

  /** Stops both writers at their safe points until `release()`. */
  async hold(options: WaitOptions = {}): Promise<GuestProgress> {
    const fields = parseFields(await this.request('hold', [], /^QSNAP-HELD /, options));
    return { epoch: num(fields, 'epoch'), page: num(fields, 'page'), rec: num(fields, 'rec') };
  }

  async release(options: WaitOptions = {}): Promise<void> {
    await this.request('release', [], /^QSNAP-RELEASED /, options);
  }

  /**
   * Debug: breaks the invariant on purpose so a test can see `check()` fail.
   * mem: pattern | epoch; disk: nonce | future | missing | stale | pattern.
   */
  async corrupt(
    target: 'mem' | 'disk',
    kind: string,
    options: WaitOptions = {},
  ): Promise<Record<string, string>> {
    return parseFields(await this.request(`corrupt-${target}`, [kind], /^QSNAP-CORRUPTED /, options));
  }

  async close(): Promise<void> {
    if (this.state === 'open') this.socket.end();
    const timer = setTimeout(() => this.socket.destroy(), 1000);
    await this.closed;
    clearTimeout(timer);
  }

  /** Sends `<verb> <token> [args]` and waits for the reply carrying the token; QSNAP-ERROR rejects. */
  private async request(verb: string, args: string[], reply: RegExp, options: WaitOptions): Promise<string> {
    const token = randomBytes(4).toString('hex');
    const text = [verb, token, ...args].join(' ');
    const answer = new RegExp(`^QSNAP-[A-Z-]+ (?:[A-Z]+ )?token=${token}(?: |$)`);
    const pending = this.waitForLine(answer, options);
    this.socket.write(`${text}\n`);
    const line = await pending;
    if (line.startsWith('QSNAP-ERROR ') || !reply.test(line)) {
      const what = line.split(' ').slice(2).join(' ');
      throw new GuestProtocolError(`the guest workload answered '${text}' with: ${what}`, {
        command: text,
        line,
      });
    }
    return line;
  }

  private onData(chunk: string): void {
    const parts = (this.partial + chunk).split(/\r\n|\n|\r/);
    this.partial = parts.pop() ?? '';
    if (this.partial.length > MAX_PARTIAL_LINE) this.partial = ''; // no newline in sight: noise
    for (const raw of parts) {
      const at = raw.indexOf('QSNAP-');
      const line = at > 0 ? raw.slice(at) : raw; // firmware escape codes may precede it
      if (line === '') continue;
      this.recent.push(line);
      if (this.recent.length > RECENT_LINES) this.recent.shift();
      for (const listener of this.listeners) listener(line);
      if (line.startsWith('QSNAP-FATAL ')) {
        this.rejectAll(new GuestProtocolError(`the guest workload died: ${line.slice(12)}`, { line }));
      }
      for (const waiter of this.waiters) {
        waiter.regex.lastIndex = 0;
        if (!waiter.regex.test(line)) continue;
        this.waiters.delete(waiter);
        clearTimeout(waiter.timer);
        waiter.resolve(line);
      }
    }
  }

  private onClose(): void {
    const wasOpen = this.state === 'open';
    this.state = 'closed';
    const err = new GuestConsoleError(
      wasOpen ? `the guest console at ${this.socketPath} disconnected` : 'the guest console was closed',
      { cause: this.closeCause, details: { socketPath: this.socketPath } },
    );
    this.rejectAll(err);
  }

  private rejectAll(err: Error): void {
    for (const waiter of this.waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(err);
    }
    this.waiters.clear();
  }

  private assertOpen(): void {
    if (this.state !== 'open' || this.socket.destroyed) {
      throw new GuestConsoleError(`the guest console at ${this.socketPath} is closed`, {
        cause: this.closeCause,
        details: { socketPath: this.socketPath },
      });
    }
  }
}

function openSocket(path: string, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path });
    const fail = (err: Error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    const timer = setTimeout(
      () => fail(Object.assign(new Error(`connect timed out after ${timeoutMs} ms`), { code: 'ETIMEDOUT' })),
      Math.max(timeoutMs, 1),
    );
    socket.once('error', fail);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.off('error', fail);
      resolve(socket);
    });
  });
}

/** Every `key=value` of a protocol line. */
export function parseFields(line: string): Record<string, string> {
  const fields: Record<string, string> = {};
  for (const m of line.matchAll(/(\w+)=(\S*)/g)) fields[m[1]!] = m[2]!;
  return fields;
}

function num(fields: Record<string, string>, key: string): number {
  const value = Number(fields[key]);
  if (fields[key] === undefined || !Number.isFinite(value)) {
    throw new GuestProtocolError(`the guest's line lacks a number for ${key}`, { key, fields });
  }
  return value;
}

export function parseReady(line: string): GuestReady {
  const f = parseFields(line);
  const runId = f['run'];
  if (!runId) throw new GuestProtocolError("the guest's READY line lacks run=", { line });
  return {
    kind: 'ready',
    runId,
    memMib: num(f, 'mem_mib'),
    pages: num(f, 'pages'),
    disk: f['disk'] === undefined || f['disk'] === 'none' ? null : f['disk'],
    slots: num(f, 'slots'),
    line,
  };
}

export function parseHeartbeat(line: string): GuestHeartbeat {
  const f = parseFields(line);
  return {
    kind: 'heartbeat',
    n: num(f, 'n'),
    epoch: num(f, 'epoch'),
    page: num(f, 'page'),
    rec: num(f, 'rec'),
    memMibps: num(f, 'mem_mibps'),
    diskIops: num(f, 'disk_iops'),
    latchedFailures: num(f, 'bad'),
    line,
  };
}
