/**
 * A scriptable QMP server on a unix socket in a temp dir, for protocol corner cases (in the
 * spirit of qemu.qmp's NullProtocol): the test drives each connection by hand: what to send,
 * when to send it, in which chunks.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export const GREETING = {
  QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'fake' }, capabilities: ['oob'] },
};

export type Request = { execute: string; arguments?: Record<string, unknown>; id?: unknown };

export class FakePeer {
  readonly dir: string;
  readonly path: string;
  #server: Server;
  #connections: PeerConnection[] = [];
  #waiting: ((c: PeerConnection) => void)[] = [];
  #accepted: PeerConnection[] = [];

  private constructor(dir: string, server: Server) {
    this.dir = dir;
    this.path = join(dir, 'qmp.sock');
    this.#server = server;
  }

  static async start(): Promise<FakePeer> {
    const dir = await mkdtemp(join(tmpdir(), 'qsnap-qmp-fake-'));
    const server = createServer();
    const peer = new FakePeer(dir, server);
    server.on('connection', (socket) => peer.#onConnection(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(peer.path, () => resolve());
    });
    return peer;
  }

  /** The next accepted connection (in order). */
  nextConnection(): Promise<PeerConnection> {
    const ready = this.#accepted.shift();
    if (ready) return Promise.resolve(ready);
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  /** Connections the peer has seen, open or not. */
  get connectionCount(): number {
    return this.#connections.length;
  }

  async stop(): Promise<void> {
    for (const c of this.#connections) c.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    await rm(this.dir, { recursive: true, force: true });
  }

  #onConnection(socket: Socket): void {
    const conn = new PeerConnection(socket);
    this.#connections.push(conn);
    const waiter = this.#waiting.shift();
    if (waiter) waiter(conn);
    else this.#accepted.push(conn);
  }
}

export class PeerConnection {
  readonly socket: Socket;
  /** Resolves when the client side has closed (or the socket otherwise ended). */
  readonly closed: Promise<void>;
  #buffer = '';
  #requests: Request[] = [];
  #waiting: ((r: Request) => void)[] = [];

  constructor(socket: Socket) {
    this.socket = socket;
    socket.setEncoding('utf8');
    socket.on('error', () => {});
    socket.on('data', (text: string) => {
      this.#buffer += text;
      for (let nl = this.#buffer.indexOf('\n'); nl !== -1; nl = this.#buffer.indexOf('\n')) {
        const line = this.#buffer.slice(0, nl).trim();
        this.#buffer = this.#buffer.slice(nl + 1);
        if (line === '') continue;
        const request = JSON.parse(line) as Request;
        const waiter = this.#waiting.shift();
        if (waiter) waiter(request);
        else this.#requests.push(request);
      }
    });
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  /** The next request the client sent. */
  receive(): Promise<Request> {
    const ready = this.#requests.shift();
    if (ready) return Promise.resolve(ready);
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  /** Sends one message as QEMU frames it: JSON, then CRLF. */
  send(message: unknown): void {
    this.sendRaw(`${JSON.stringify(message)}\r\n`);
  }

  sendRaw(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** Writes `data` in pieces of `size` bytes, yielding to the event loop between them. */
  async sendChunked(data: string | Buffer, size: number): Promise<void> {
    const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data);
    for (let i = 0; i < bytes.length; i += size) {
      this.socket.write(bytes.subarray(i, i + size));
      await sleep(1);
    }
  }

  reply(request: Request, value: unknown = {}): void {
    this.send({ return: value, id: request.id });
  }

  replyError(request: Request, errorClass: string, desc: string): void {
    this.send({ error: { class: errorClass, desc }, id: request.id });
  }

  event(name: string, data?: Record<string, unknown>, seconds = 1_700_000_000, microseconds = 123_456): void {
    this.send({ event: name, ...(data ? { data } : {}), timestamp: { seconds, microseconds } });
  }

  /** Greets, then answers qmp_capabilities. Returns the negotiation request. */
  async handshake(): Promise<Request> {
    this.send(GREETING);
    const request = await this.receive();
    this.reply(request);
    return request;
  }

  /** Half-closes: the client sees EOF. */
  end(): void {
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }
}
