import { readFile } from 'node:fs/promises';
import { isIPv4 } from 'node:net';
import { decodeProcAddress } from '../vm/peer.js';

/**
 * The uid owning the other end of a loopback TCP connection to the daemon, from the kernel's
 * socket table: the row whose local address is the client's and whose remote address is ours
 * (net/ipv4/tcp_ipv4.c get_tcp4_sock: `sl local rem st tx:rx tr:when retrnsmt uid …`). Used
 * to hand the dashboard its session cookie only to the daemon's own user.
 */
export async function loopbackPeerUid(
  client: { address: string; port: number },
  server: { address: string; port: number },
): Promise<number | undefined> {
  if (!isIPv4(client.address)) return undefined;
  const text = await readFile('/proc/net/tcp', 'utf8').catch(() => '');
  for (const line of text.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 8) continue;
    const [local, remote] = [endpoint(f[1]!), endpoint(f[2]!)];
    if (!local || !remote) continue;
    if (
      local.address === client.address &&
      local.port === client.port &&
      remote.address === server.address &&
      remote.port === server.port
    )
      return Number(f[7]);
  }
  return undefined;
}

function endpoint(field: string): { address: string; port: number } | undefined {
  const [hex, port] = field.split(':');
  if (!hex || !port || hex.length !== 8) return undefined;
  return { address: decodeProcAddress(hex), port: Number.parseInt(port, 16) };
}
