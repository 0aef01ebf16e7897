import { resolve } from 'node:path';
import { startDaemon } from '../../daemon/daemon.js';
import type { Listen } from '../../daemon/server.js';
import { parseCommand, UsageError } from '../args.js';
import type { CliEnv } from '../env.js';
import { STORE_HELP, STORE_OPTION } from '../store.js';

const spec = {
  name: 'serve',
  summary:
    'Run the qsnap daemon in the foreground: it attaches VMs by their QMP socket (or launches them),\n' +
    'runs the operations of each VM one at a time and at most --max-streams RAM streams at once, and\n' +
    'serves the WebSocket API (docs/api.md) at ws://HOST:PORT/v1 and a dashboard at http://HOST:PORT/.\n' +
    'Clients authenticate with the token in $XDG_STATE_HOME/qsnap/daemon.token (made on first start,\n' +
    'mode 0600). Stopping the daemon (Ctrl-C, SIGTERM) leaves every VM running; started again, it\n' +
    're-attaches them and finishes what a killed daemon left half done.',
  usage: 'qsnap serve [--store DIR] [--listen 127.0.0.1:PORT | --socket PATH] [--max-streams N]',
  options: {
    ...STORE_OPTION,
    listen: { type: 'string' },
    socket: { type: 'string' },
    'max-streams': { type: 'string' },
  },
  help: {
    ...STORE_HELP,
    listen: 'loopback address and port to listen on (default 127.0.0.1:7325; port 0: any free port)',
    socket: 'listen on a unix socket instead (mode 0600)',
    'max-streams': 'snapshot/restore/verify streams at once, over all VMs (default 2)',
  },
  examples: [
    'qsnap serve',
    'qsnap serve --listen 127.0.0.1:0 --max-streams 1',
    'qsnap serve --socket /run/qsnap.sock',
  ],
} as const;

export const DEFAULT_PORT = 7325;

export async function serveCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values } = parsed;
  if (values.listen && values.socket) throw new UsageError('serve: give --listen or --socket, not both');
  const listen: Listen = values.socket
    ? { kind: 'unix', path: resolve(values.socket) }
    : parseListen(values.listen ?? `127.0.0.1:${DEFAULT_PORT}`);
  const maxStreams = values['max-streams'] === undefined ? 2 : Number(values['max-streams']);
  if (!Number.isInteger(maxStreams) || maxStreams < 1)
    throw new UsageError(`--max-streams: ${values['max-streams']} is not a whole number of at least 1`);
  const log = (line: string) => process.stdout.write(`${new Date().toISOString()} ${line}\n`);
  const daemon = await startDaemon({
    storeDir: values.store ? resolve(values.store) : env.storeDir,
    stateDir: env.stateDir,
    listen,
    maxStreams,
    faults: env.faults,
    inlineStreams: env.daemonInline,
    log,
  });
  for (const line of daemon.startup) log(line);
  log(`listening ${daemon.url} (token: ${daemon.tokenFile}, max streams ${maxStreams})`);
  if (listen.kind === 'tcp') log(`dashboard ${daemon.url.replace(/^ws/, 'http').replace(/\/v1$/, '/')}`);
  await new Promise<void>((done) => {
    const stop = (signal: string) => {
      log(`${signal}: stopping (the VMs keep running)`);
      done();
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
  await daemon.close();
  return 0;
}

/** Loopback only: the API controls VMs, and a token is all that guards it. */
function parseListen(text: string): Listen {
  const m = /^(127\.\d+\.\d+\.\d+|localhost):(\d+)$/.exec(text);
  const port = Number(m?.[2]);
  if (!m || !Number.isInteger(port) || port > 65535)
    throw new UsageError(
      `--listen: ${text} is not a loopback address and port`,
      'give 127.0.0.1:PORT (the daemon listens on loopback only), or --socket PATH',
    );
  return { kind: 'tcp', host: m[1] === 'localhost' ? '127.0.0.1' : m[1]!, port };
}
