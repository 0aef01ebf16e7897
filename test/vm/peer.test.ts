/**
 * Finding the local process behind a QMP endpoint. The parsers are fed /proc text copied from
 * a machine running QEMU; the rest runs against real QEMUs (TCG, no guest, `-S`), listeners of
 * this process, and a process of another user. Every QEMU and child is stopped by pid and every
 * temp directory removed, whatever happened.
 */
import { describe, expect, it } from 'vitest';
import {
  abstractName,
  canonicalIpv6,
  decodeProcAddress,
  localListenAddresses,
  parseProcCmdline,
  parseProcNetTcp,
  parseProcNetUnix,
  qemuCommandLine,
  tcpListeners,
  unixListeners,
} from '../../src/vm/peer.js';

/**
 * /proc/net/unix while a QEMU listened on qmp.sock (a client connected: the accepted socket
 * 122920, St 03, prints the same path), on a path with spaces and on an abstract name; then
 * a datagram socket, a SEQPACKET listener, a listener whose path holds a newline, a stream
 * socket bound but not listening, an abstract name with a NUL, an autobound one, and unbound
 * sockets whose inodes the kernel pads to five digits.
 */
const PROC_NET_UNIX = `Num       RefCount Protocol Flags    Type St Inode Path
000000001b43c165: 00000002 00000000 00010000 0001 01 122904 /tmp/peerprobe/qmp.sock
0000000056f6463d: 00000002 00000000 00010000 0001 01 122906 /tmp/peerprobe/with space/s p.sock
000000007e1db23f: 00000003 00000000 00000000 0001 03 122920 /tmp/peerprobe/qmp.sock
0000000065c86140: 00000002 00000000 00010000 0001 01 122907 @qsnapabs
000000000c7a35cc: 00000002 00000000 00000000 0002 01 126615 /tmp/peerprobe/dg.sock
00000000e23a8006: 00000002 00000000 00010000 0005 01 126616 /tmp/peerprobe/sp.sock
000000009931aed8: 00000002 00000000 00010000 0001 01 126617 /tmp/peerprobe/nl
sock
0000000027d41759: 00000002 00000000 00000000 0001 01 126620 /tmp/peerprobe/bound-not-listening.sock
000000009fec32bf: 00000002 00000000 00010000 0001 01 126618 @abs@with-nul
00000000d997bad7: 00000002 00000000 00000000 0001 01 126619 @a006c
0000000006472cac: 00000003 00000000 00000000 0001 03  1074
00000000b0b88650: 00000003 00000000 00000000 0001 03 124027
`;

/** /proc/net/tcp: QEMU on 127.0.0.1:45123 with a client connected (both ends), another listener on 0.0.0.0:2024, a TIME_WAIT row. */
const PROC_NET_TCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     
   0: 0100007F:B043 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123952 1 00000000502bb99b 100 0 0 10 0                    
   1: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 624 1 000000006a365a36 100 0 0 10 0                       
   2: 0100007F:B043 0100007F:AA0A 01 00000000:00000000 00:00000000 00000000     0        0 123029 1 00000000ee18715a 20 0 0 11 -1                    
   3: 0100007F:AA0A 0100007F:B043 01 00000000:00000000 00:00000000 00000000     0        0 124019 2 000000008b98c387 20 4 30 10 -1                   
   4: 0100007F:AA0A 0100007F:B043 06 00000000:00000000 03:00000000 00000000     0        0 0 3 00000000873ec009                                      
`;

/** /proc/net/tcp6: QEMU on [::1]:45124 (a client connected) and on [::]:45125; a v4-mapped connection to a dual-stack listener on 45126. */
const PROC_NET_TCP6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:B044 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123951 1 00000000dc663087 100 0 0 10 0
   1: 00000000000000000000000000000000:B045 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123953 1 0000000035e42cfa 100 0 0 10 0
   2: 00000000000000000000000001000000:DF08 00000000000000000000000001000000:B044 01 00000000:00000000 00:00000000 00000000     0        0 124020 2 00000000c8d594e7 20 4 30 10 -1
   3: 00000000000000000000000001000000:B044 00000000000000000000000001000000:DF08 01 00000000:00000000 00:00000000 00000000     0        0 123030 1 00000000cfbb3283 20 0 0 11 -1
   4: 0000000000000000FFFF00000100007F:B046 0000000000000000FFFF00000100007F:A2E4 01 00000000:00000000 00:00000000 00000000     0        0 123560 1 000000008fdb4f04 20 0 0 10 -1
`;

describe('parseProcNetUnix', () => {
  const rows = parseProcNetUnix(PROC_NET_UNIX);

  it('reads every row: the header skipped, padded inodes, unbound sockets without a path', () => {
    expect(rows).toHaveLength(12);
    expect(rows.at(-2)).toEqual({
      inode: 1074,
      flags: 0,
      type: 1,
      state: 3,
      path: undefined,
      listening: false,
    });
    expect(rows.map((r) => r.inode)).toContain(124027);
  });

  it('tells the listener from the accepted socket that prints the same path', () => {
    const onPath = rows.filter((r) => r.path === '/tmp/peerprobe/qmp.sock');
    expect(onPath.map((r) => [r.inode, r.listening])).toEqual([
      [122904, true],
      [122920, false],
    ]);
    expect(unixListeners(rows, ['/tmp/peerprobe/qmp.sock']).map((r) => r.inode)).toEqual([122904]);
  });

  it('keeps spaces and newlines in a path, and abstract names as printed', () => {
    expect(unixListeners(rows, ['/tmp/peerprobe/with space/s p.sock']).map((r) => r.inode)).toEqual([122906]);
    expect(unixListeners(rows, ['/tmp/peerprobe/nl\nsock']).map((r) => r.inode)).toEqual([126617]);
    expect(unixListeners(rows, ['/tmp/peerprobe/nl'])).toEqual([]); // not cut at the newline
    expect(unixListeners(rows, [abstractName('\0qsnapabs')]).map((r) => r.inode)).toEqual([122907]);
    expect(unixListeners(rows, [abstractName('\0abs\0with-nul')]).map((r) => r.inode)).toEqual([126618]);
  });

  it('counts only sockets in listen(2) as listeners: not datagrams, not bound-only sockets', () => {
    expect(rows.filter((r) => r.listening).map((r) => r.inode)).toEqual([
      122904, 122906, 122907, 126616, 126617, 126618,
    ]);
    expect(unixListeners(rows, ['/tmp/peerprobe/dg.sock'])).toEqual([]);
    expect(unixListeners(rows, ['/tmp/peerprobe/bound-not-listening.sock'])).toEqual([]);
    expect(unixListeners(rows, ['/tmp/peerprobe/sp.sock']).map((r) => r.type)).toEqual([5]);
  });

  it('finds every listener bound to a name (two are ambiguous, never one picked)', () => {
    const second = '00000000deadbeef: 00000002 00000000 00010000 0001 01 200000 /tmp/peerprobe/qmp.sock\n';
    const twice = parseProcNetUnix(PROC_NET_UNIX + second);
    expect(unixListeners(twice, ['/tmp/peerprobe/qmp.sock']).map((r) => r.inode)).toEqual([122904, 200000]);
  });
});

describe('parseProcNetTcp', () => {
  const v4 = parseProcNetTcp(PROC_NET_TCP, 'LE');
  const v6 = parseProcNetTcp(PROC_NET_TCP6, 'LE');

  it('reads addresses, ports, states and inodes, TIME_WAIT rows included', () => {
    expect(v4).toHaveLength(5);
    expect(v4[0]).toEqual({
      family: 4,
      address: '127.0.0.1',
      port: 45123,
      state: 0x0a,
      inode: 123952,
      listening: true,
    });
    expect(v4[1]).toMatchObject({ address: '0.0.0.0', port: 2024, listening: true });
    expect(v4[4]).toMatchObject({ state: 6, inode: 0, listening: false });
    expect(v6.map((r) => r.address)).toEqual(['::1', '::', '::1', '::1', '::ffff:7f00:1']);
  });

  it('finds the listener on a port, not the connections on it', () => {
    const rows = [...v4, ...v6];
    expect(tcpListeners(rows, localListenAddresses('127.0.0.1')!, 45123).map((r) => r.inode)).toEqual([
      123952,
    ]);
    expect(tcpListeners(rows, localListenAddresses('::1')!, 45124).map((r) => r.inode)).toEqual([123951]);
    expect(tcpListeners(rows, localListenAddresses('::1')!, 45123)).toEqual([]);
    // A listener on [::] answers 127.0.0.1 as well as ::1 (dual stack).
    expect(tcpListeners(rows, localListenAddresses('127.0.0.1')!, 45125).map((r) => r.inode)).toEqual([
      123953,
    ]);
    expect(tcpListeners(rows, localListenAddresses('localhost')!, 45125).map((r) => r.inode)).toEqual([
      123953,
    ]);
  });

  it('decodes each 32-bit word in the host byte order', () => {
    expect(decodeProcAddress('0100007F', 'LE')).toBe('127.0.0.1');
    expect(decodeProcAddress('7F000001', 'BE')).toBe('127.0.0.1');
    expect(decodeProcAddress('00000000000000000000000001000000', 'LE')).toBe('::1');
    expect(decodeProcAddress('00000000000000000000000000000001', 'BE')).toBe('::1');
    expect(decodeProcAddress('0100007F', 'BE')).toBe('1.0.0.127'); // control: the order matters
  });
});

describe('localListenAddresses', () => {
  it('knows the loopback names, in any spelling', () => {
    expect(localListenAddresses('LOCALHOST')).toEqual(localListenAddresses('localhost'));
    expect(localListenAddresses('0:0:0:0:0:0:0:1')).toEqual(['::1', '::']);
    expect(localListenAddresses('0.0.0.0')).toEqual(localListenAddresses('127.0.0.1'));
    expect(localListenAddresses('127.0.0.1')).toContain(canonicalIpv6('::ffff:127.0.0.1'));
  });

  it('is undefined for anything else', () => {
    for (const host of ['192.0.2.1', '127.0.0.2', 'example.com', 'fd00::2']) {
      expect(localListenAddresses(host), host).toBeUndefined();
    }
  });
});

describe('parseProcCmdline', () => {
  it('splits on NUL, keeps empty arguments, drops only the terminator', () => {
    expect(parseProcCmdline('qemu-system-x86_64\0-name\0\0-S\0')).toEqual([
      'qemu-system-x86_64',
      '-name',
      '',
      '-S',
    ]);
    expect(parseProcCmdline('a title set by the process')).toEqual(['a title set by the process']);
    expect(parseProcCmdline('')).toEqual([]);
  });
});

describe('qemuCommandLine', () => {
  const control = [
    '-chardev',
    'socket,id=qsnap-control,path=/run/x/control.sock,server=on,wait=off',
    '-mon',
    'chardev=qsnap-control,mode=control',
  ];
  const user = ['-accel', 'tcg', '-m', '64', '-S', '-qmp', 'unix:/run/x/qmp.sock,server=on,wait=off'];

  it('drops qsnap-control and keeps everything else verbatim, the binary first', () => {
    expect(qemuCommandLine(['/usr/bin/qemu-system-x86_64', ...user, ...control])).toEqual([
      '/usr/bin/qemu-system-x86_64',
      ...user,
    ]);
    expect(qemuCommandLine([...control, ...user])).toEqual(user);
  });

  it('keeps a command line without it as it is (control)', () => {
    expect(qemuCommandLine(['qemu', ...user])).toEqual(['qemu', ...user]);
  });

  it('reads options, not words: --chardev too, other ids and values that look alike stay', () => {
    const argv = [
      'qemu',
      '--chardev',
      'socket,id=qsnap-control,path=/a,,b.sock,server=on',
      '-chardev',
      'socket,id=qsnap-control2,path=/c.sock,server=on',
      '-name',
      'chardev=qsnap-control,mode=control',
      '--mon',
      'qsnap-control',
      '-nodefaults',
    ];
    expect(qemuCommandLine(argv)).toEqual([
      'qemu',
      '-chardev',
      'socket,id=qsnap-control2,path=/c.sock,server=on',
      '-name',
      'chardev=qsnap-control,mode=control',
      '-nodefaults',
    ]);
  });
});
