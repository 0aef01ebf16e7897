import { readFile, rm } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import { type WebSocket, WebSocketServer } from 'ws';
import { asQsnapError, type QsnapError } from '../errors.js';
import type { Controller } from './controller.js';
import { DaemonError } from './errors.js';
import { HANDLERS, type OpContext } from './ops.js';
import { loopbackPeerUid } from './peer-uid.js';
import {
  type Event,
  LIMITS,
  OP_NAMES,
  OpArgs,
  type OpName,
  RequestEnvelope,
  ServerFrame,
} from './protocol.js';
import { sameToken } from './token.js';

export type Listen = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export interface ServerOptions {
  controller: Controller;
  token: string;
  listen: Listen;
  log: (line: string) => void;
}

/** The dashboard's files (dashboard/ at the package root, beside src/ and dist/). */
const DASHBOARD = fileURLToPath(new URL('../../dashboard/', import.meta.url));
const ASSETS: Record<string, { file: string; type: string }> = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/app.js': { file: 'app.js', type: 'text/javascript; charset=utf-8' },
  '/style.css': { file: 'style.css', type: 'text/css; charset=utf-8' },
};
const COOKIE = 'qsnap_session';
/** Frames to a client that reads slower than events come are dropped past this (results never). */
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024;

interface Connection {
  ws: WebSocket;
  /** Operations this connection asked for: operation id → request id. */
  asked: Map<string, string>;
  /** undefined: not subscribed; empty: every VM; else these VMs. */
  filter: Set<string> | undefined;
  inFlight: number;
}

/**
 * The daemon's front door: an HTTP server for the dashboard and the WebSocket endpoint /v1.
 * A connection is authenticated at the upgrade (ws `verifyClient`), before it exists: a bearer
 * token, or the dashboard's session cookie from a page of the daemon's own origin. Each frame is
 * parsed into a request (protocol.ts), handed to the op table (ops.ts), and answered; events of
 * the controller go to the client that asked and to subscribers.
 */
export class DaemonServer {
  readonly http: Server;
  readonly wss: WebSocketServer;
  readonly connections = new Set<Connection>();
  #origins = new Set<string>();

  constructor(readonly options: ServerOptions) {
    this.http = createServer((req, res) => {
      void this.#page(req, res);
    });
    this.wss = new WebSocketServer({
      noServer: true,
      maxPayload: LIMITS.maxFrameBytes,
      perMessageDeflate: false,
    });
    this.http.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
      const refusal = this.#refuse(req);
      if (refusal) {
        socket.end(
          `HTTP/1.1 ${refusal.status} ${refusal.reason}\r\nConnection: close\r\nContent-Type: text/plain\r\n` +
            `Content-Length: ${Buffer.byteLength(refusal.text)}\r\n\r\n${refusal.text}`,
        );
        return;
      }
      this.wss.handleUpgrade(req, socket, head, (ws) => this.#open(ws));
    });
    options.controller.events.on('event', (event: Event) => this.#route(event));
  }

  async listen(): Promise<string> {
    const { listen } = this.options;
    if (listen.kind === 'unix') await rm(listen.path, { force: true });
    await new Promise<void>((resolve, reject) => {
      this.http.once('error', (err) =>
        reject(
          new DaemonError('QSNAP_DAEMON_LISTEN', `cannot listen on ${describe(listen)}: ${err.message}`, {
            hint: 'choose another --listen port or --socket path (is another qsnap serve running?)',
            cause: err,
          }),
        ),
      );
      if (listen.kind === 'unix') this.http.listen(listen.path, resolve);
      else this.http.listen(listen.port, listen.host, resolve);
    });
    if (listen.kind === 'unix') {
      const { chmod } = await import('node:fs/promises');
      await chmod(listen.path, 0o600);
      return `ws+unix://${listen.path}:/v1`;
    }
    const port = (this.http.address() as AddressInfo).port;
    for (const host of [listen.host, 'localhost', '127.0.0.1']) this.#origins.add(`http://${host}:${port}`);
    return `ws://${listen.host}:${port}/v1`;
  }

  async close(): Promise<void> {
    for (const c of this.connections) c.ws.close(1001, 'daemon stopping');
    await new Promise<void>((resolve) => this.wss.close(() => resolve()));
    await new Promise<void>((resolve) => this.http.close(() => resolve()));
    if (this.options.listen.kind === 'unix') await rm(this.options.listen.path, { force: true });
  }

  // ─── HTTP: the dashboard ─────────────────────────────────────────────────────────────

  async #page(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://daemon');
    const asset = req.method === 'GET' ? ASSETS[url.pathname] : undefined;
    if (!asset) {
      res.writeHead(url.pathname === '/v1' ? 426 : 404, { 'Content-Type': 'text/plain' }).end('not found\n');
      return;
    }
    const headers: Record<string, string | string[]> = {
      'Content-Type': asset.type,
      'Cache-Control': 'no-store',
      'X-Content-Type-Options': 'nosniff',
      'X-Frame-Options': 'DENY',
      'Content-Security-Policy':
        "default-src 'self'; connect-src 'self' ws://127.0.0.1:* ws://localhost:*; img-src 'self' data:; frame-ancestors 'none'",
      'Referrer-Policy': 'no-referrer',
    };
    if (url.pathname === '/') {
      // The session cookie goes only to a browser of the daemon's own user: the uid owning the
      // other end of this loopback connection (the kernel's socket table) must be ours.
      if (!(await this.#sameUser(req))) {
        res
          .writeHead(403, { 'Content-Type': 'text/plain' })
          .end('the dashboard is for the daemon’s own user\n');
        return;
      }
      headers['Set-Cookie'] = `${COOKIE}=${this.options.token}; HttpOnly; SameSite=Strict; Path=/v1`;
    }
    res.writeHead(200, headers).end(await readFile(`${DASHBOARD}${asset.file}`));
  }

  async #sameUser(req: IncomingMessage): Promise<boolean> {
    const s = req.socket;
    if (!s.remoteAddress || !s.remotePort || !s.localAddress || !s.localPort) return false;
    const uid = await loopbackPeerUid(
      { address: s.remoteAddress, port: s.remotePort },
      { address: s.localAddress, port: s.localPort },
    );
    return uid !== undefined && uid === process.getuid?.();
  }

  // ─── WebSocket ───────────────────────────────────────────────────────────────────────

  #refuse(req: IncomingMessage): { status: number; reason: string; text: string } | undefined {
    const url = new URL(req.url ?? '/', 'http://daemon');
    if (url.pathname !== '/v1') return { status: 404, reason: 'Not Found', text: 'the endpoint is /v1\n' };
    const origin = req.headers.origin;
    // A browser always sends Origin: only the daemon's own page may connect.
    if (origin !== undefined && !this.#origins.has(origin))
      return { status: 403, reason: 'Forbidden', text: 'this origin may not use the daemon\n' };
    const auth = req.headers.authorization ?? '';
    const bearer = /^Bearer (\S+)$/.exec(auth)?.[1];
    const cookie = origin !== undefined ? cookieValue(req.headers.cookie, COOKIE) : undefined;
    const presented = bearer ?? cookie;
    if (!presented || !sameToken(presented, this.options.token))
      return {
        status: 401,
        reason: 'Unauthorized',
        text: 'send Authorization: Bearer <token> ($XDG_STATE_HOME/qsnap/daemon.token)\n',
      };
    if (this.connections.size >= LIMITS.maxConnections)
      return { status: 503, reason: 'Service Unavailable', text: 'too many connections\n' };
    return undefined;
  }

  #open(ws: WebSocket): void {
    const conn: Connection = { ws, asked: new Map(), filter: undefined, inFlight: 0 };
    this.connections.add(conn);
    ws.on('message', (data, isBinary) => {
      void this.#onFrame(conn, isBinary ? undefined : data.toString());
    });
    ws.on('close', () => this.connections.delete(conn));
    ws.on('error', () => this.connections.delete(conn));
  }

  async #onFrame(conn: Connection, text: string | undefined): Promise<void> {
    let id: string | null = null;
    try {
      if (text === undefined) throw badRequest('binary frames are not part of the protocol');
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        throw badRequest('the frame is not JSON');
      }
      const envelope = RequestEnvelope.safeParse(json);
      if (!envelope.success) {
        const maybeId = (json as { id?: unknown } | null)?.id;
        if (typeof maybeId === 'string' && maybeId.length <= 64) id = maybeId;
        throw badRequest('the frame is not a request', envelope.error.issues);
      }
      id = envelope.data.id;
      const op = envelope.data.op;
      if (!(OP_NAMES as string[]).includes(op))
        throw badRequest(`unknown op "${op.slice(0, 32)}"`, undefined, `the ops are: ${OP_NAMES.join(', ')}`);
      const args = OpArgs[op as OpName].safeParse(envelope.data.args ?? {});
      if (!args.success) throw badRequest(`wrong args for ${op}`, args.error.issues);
      if (conn.inFlight >= LIMITS.maxInFlight)
        throw new DaemonError('QSNAP_DAEMON_LIMIT', `more than ${LIMITS.maxInFlight} requests in flight`, {
          hint: 'wait for replies before sending more',
        });
      conn.inFlight++;
      const requestId = id;
      let opId: string | undefined;
      const ctx: OpContext = {
        begin: (o) => {
          opId = o.id;
          conn.asked.set(o.id, requestId);
        },
        subscribe: (vms) => {
          conn.filter = new Set(vms ?? []);
        },
      };
      try {
        const handler = HANDLERS[op as OpName] as (
          c: Controller,
          a: unknown,
          x: OpContext,
        ) => Promise<Record<string, unknown>>;
        const result = await handler(this.options.controller, args.data, ctx);
        this.#send(conn, { v: 1, id: requestId, ...(opId ? { op: opId } : {}), ok: true, result }, true);
      } catch (err) {
        this.#send(
          conn,
          { v: 1, id: requestId, ...(opId ? { op: opId } : {}), ok: false, error: wire(asQsnapError(err)) },
          true,
        );
      } finally {
        conn.inFlight--;
        if (opId) conn.asked.delete(opId);
      }
    } catch (err) {
      this.#send(conn, { v: 1, id, ok: false, error: wire(asQsnapError(err)) }, true);
    }
  }

  #route(event: Event): void {
    for (const conn of this.connections) {
      const requestId = event.op ? conn.asked.get(event.op) : undefined;
      const subscribed =
        conn.filter !== undefined &&
        (conn.filter.size === 0 || event.vm === undefined || conn.filter.has(event.vm));
      if (requestId !== undefined) this.#send(conn, { ...event, id: requestId }, event.event !== 'progress');
      else if (subscribed) this.#send(conn, event, event.event !== 'progress');
    }
  }

  /** Every frame sent is checked against the protocol first: a bug here never reaches a client. */
  #send(conn: Connection, frame: ServerFrame, mustSend: boolean): void {
    if (conn.ws.readyState !== conn.ws.OPEN) return;
    if (!mustSend && conn.ws.bufferedAmount > MAX_BUFFERED_BYTES) return;
    const checked = ServerFrame.safeParse(frame);
    if (!checked.success) {
      this.options.log(
        `internal: a frame failed the protocol check: ${JSON.stringify(checked.error.issues)}`,
      );
      return;
    }
    conn.ws.send(JSON.stringify(frame));
  }
}

function badRequest(message: string, issues?: unknown, hint?: string): DaemonError {
  return new DaemonError('QSNAP_DAEMON_REQUEST', message, {
    hint: hint ?? 'see docs/api.md for the requests and their args',
    ...(issues ? { details: { issues } } : {}),
  });
}

/** An error as it crosses the wire: code, message, hint, details (no stack, no local causes). */
function wire(error: QsnapError): {
  code: string;
  message: string;
  hint?: string;
  details?: Record<string, unknown>;
} {
  const json = error.toJSON();
  return {
    code: json.code,
    message: json.message,
    ...(json.hint ? { hint: json.hint } : {}),
    ...(json.details ? { details: json.details } : {}),
  };
}

function cookieValue(header: string | undefined, name: string): string | undefined {
  for (const part of (header ?? '').split(';')) {
    const [k, ...v] = part.trim().split('=');
    if (k === name) return v.join('=');
  }
  return undefined;
}

function describe(listen: Listen): string {
  return listen.kind === 'unix' ? listen.path : `${listen.host}:${listen.port}`;
}
