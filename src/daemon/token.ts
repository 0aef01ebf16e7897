import { randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdir, open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { DaemonError } from './errors.js';

/** The daemon's bearer token: `<state dir>/daemon.token` ($XDG_STATE_HOME/qsnap by default). */
export function tokenPath(stateDir: string): string {
  return join(stateDir, 'daemon.token');
}

const TOKEN = /^[A-Za-z0-9_-]{43}$/;

/**
 * The token, created on first start (32 random bytes, base64url, mode 0600). A token file that
 * group or others can read is refused: anyone who reads it controls every attached VM.
 */
export async function loadOrCreateToken(stateDir: string): Promise<string> {
  const path = tokenPath(stateDir);
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  try {
    const handle = await open(path, 'wx', 0o600);
    const token = randomBytes(32).toString('base64url');
    try {
      await handle.writeFile(`${token}\n`);
      await handle.sync();
    } finally {
      await handle.close();
    }
    return token;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw tokenError(path, 'cannot be created', err);
  }
  return readToken(path);
}

/** Read an existing token file (the client does this too), checking its mode first. */
export async function readToken(path: string): Promise<string> {
  const info = await stat(path).catch((err: unknown) => {
    throw tokenError(path, 'cannot be read', err);
  });
  if ((info.mode & 0o077) !== 0)
    throw new DaemonError(
      'QSNAP_DAEMON_TOKEN',
      `the token file ${path} is readable by others (mode ${(info.mode & 0o777).toString(8)})`,
      { hint: `chmod 600 ${path} (or remove it: a new token is made on the next start)`, details: { path } },
    );
  const token = (await readFile(path, 'utf8')).trim();
  if (!TOKEN.test(token))
    throw new DaemonError('QSNAP_DAEMON_TOKEN', `the token file ${path} does not hold a qsnap token`, {
      hint: 'remove it: a new token is made on the next start of qsnap serve',
      details: { path },
    });
  return token;
}

/** Constant-time comparison of a presented token with the daemon's. */
export function sameToken(presented: string, token: string): boolean {
  const a = Buffer.from(presented);
  const b = Buffer.from(token);
  return a.length === b.length && timingSafeEqual(a, b);
}

function tokenError(path: string, what: string, cause: unknown): DaemonError {
  return new DaemonError('QSNAP_DAEMON_TOKEN', `the token file ${path} ${what}`, {
    hint: 'check the permissions of the state directory ($XDG_STATE_HOME/qsnap)',
    cause,
    details: { path },
  });
}
