import { it } from 'vitest';
import { snapshotFixture } from './fixtures.js';
import { formatStats, fuzz } from './runner.js';
import { manifestTarget } from './targets.js';

it('manifest long', async () => {
  const f = await snapshotFixture();
  const stats = await fuzz(manifestTarget(f.manifest), {
    seed: 923496151 % 1000003,
    numRuns: 2 ** 31 - 1,
    timeLimitMs: 150_000,
  });
  console.log(formatStats(stats));
  if (stats.finding) console.log(JSON.stringify(stats.finding).slice(0, 3000));
  await f.dispose();
}, 400_000);
