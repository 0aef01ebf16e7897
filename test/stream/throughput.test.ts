/**
 * Parser throughput on a synthetic stream of 1 GiB of data pages fed in 64 KiB chunks (the
 * size a unix socket read gives), with a sink that touches every page. The number is printed;
 * the assertion is a floor well under it, to catch a regression (a copy or allocation per page)
 * without failing on a busy machine.
 */
import { describe, expect, it } from 'vitest';
import {
  encodePrologue,
  MigrationStreamParser,
  PAGE_SIZE,
  writeMigrationStream,
} from '../../src/stream/index.js';
import { synthTail } from './helpers.js';

const GiB = 1024 * 1024 * 1024;

async function synthGiBStream(): Promise<Buffer> {
  const data = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  // Copy each section into one buffer, so the writer's own buffers are recycled as they would
  // be when piped to a socket (retaining 1 GiB of 1 MiB buffers mostly measures the kernel).
  const out = Buffer.allocUnsafe(Math.ceil(GiB * 1.01));
  let length = 0;
  const started = process.hrtime.bigint();
  for await (const chunk of writeMigrationStream({
    prologue: encodePrologue({ machine: 'pc-i440fx-7.2', capabilities: [] }),
    ramSetup: {
      sectionId: 2,
      blocks: [{ idstr: 'pc.ram', usedLength: GiB }],
      footers: true,
      ignoreShared: false,
    },
    pages: function* () {
      for (let offset = 0; offset < GiB; offset += data.length) yield { offset, data };
    },
    deviceTail: synthTail(),
  })) {
    length += chunk.copy(out, length);
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  console.log(
    `writer throughput (and a copy), 1 GiB in 1 MiB PART sections: ${(GiB / seconds / 1e9).toFixed(2)} GB/s`,
  );
  return out.subarray(0, length);
}

describe('MigrationStreamParser throughput', () => {
  it('parses 1 GiB of pages fed in 64 KiB chunks well over 2 GB/s', async () => {
    const stream = await synthGiBStream();
    const runs: number[] = [];
    for (let run = 0; run < 3; run++) {
      let pages = 0;
      let checksum = 0;
      const parser = new MigrationStreamParser({
        onPrologue() {},
        onRamSetup() {},
        onPage(_block, _offset, data) {
          pages++;
          checksum ^= data[PAGE_SIZE - 1]!;
        },
        onZeroPage() {},
        onRamPart() {},
        onEnd() {},
      });
      const started = process.hrtime.bigint();
      for (let pos = 0; pos < stream.length; pos += 65536) parser.feed(stream.subarray(pos, pos + 65536));
      parser.end();
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      expect(pages).toBe(GiB / PAGE_SIZE);
      expect(checksum).toBeGreaterThanOrEqual(0);
      runs.push(GiB / seconds / 1e9);
    }
    const best = Math.max(...runs);
    console.log(
      `parser throughput, 1 GiB in 64 KiB chunks: ${runs.map((r) => r.toFixed(2)).join(', ')} GB/s`,
    );
    expect(best).toBeGreaterThan(2);
  });
});
