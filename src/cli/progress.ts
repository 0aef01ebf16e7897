import type { OperationEvent } from '../engine/operation.js';
import { formatBytes } from './output.js';

/**
 * Draws an operation's progress on a terminal (stderr): a bar with bytes, rate and phase.
 * Does nothing when stderr is not a TTY or in --json mode, so scripts get clean output.
 */
export class ProgressBar {
  private phase = '';
  private lastDraw = 0;
  private started = performance.now();
  private drawn = false;
  /** Drawing on a terminal (warnings are printed here then; otherwise the command reports them). */
  readonly enabled: boolean;

  constructor(
    enabled: boolean,
    private readonly stream: NodeJS.WriteStream = process.stderr,
  ) {
    this.enabled = enabled && stream.isTTY === true;
  }

  readonly onEvent = (event: OperationEvent): void => {
    if (!this.enabled) return;
    if (event.type === 'phase') {
      this.phase = event.phase;
      if (event.phase === 'stream') this.started = performance.now();
      this.draw(undefined, true);
    } else if (event.type === 'progress') {
      this.draw(event, false);
    } else if (event.type === 'warning') {
      this.clear();
      this.stream.write(`warning: ${event.message}\n`);
    }
  };

  private draw(progress: { doneBytes: number; totalBytes: number } | undefined, force: boolean): void {
    const now = performance.now();
    if (!force && now - this.lastDraw < 100) return;
    this.lastDraw = now;
    const width = Math.max(10, Math.min(40, (this.stream.columns ?? 80) - 50));
    let line = `${this.phase.padEnd(9)}`;
    if (progress && progress.totalBytes > 0) {
      const ratio = Math.min(1, progress.doneBytes / progress.totalBytes);
      const filled = Math.round(ratio * width);
      const seconds = (now - this.started) / 1000;
      const rate = seconds > 0 ? progress.doneBytes / seconds : 0;
      line += ` [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(ratio * 100).toFixed(0).padStart(3)}% ${formatBytes(progress.doneBytes)}/${formatBytes(progress.totalBytes)} ${formatBytes(rate)}/s`;
    }
    this.stream.write(`\r\x1b[K${line}`);
    this.drawn = true;
  }

  clear(): void {
    if (this.enabled && this.drawn) this.stream.write('\r\x1b[K');
    this.drawn = false;
  }
}
