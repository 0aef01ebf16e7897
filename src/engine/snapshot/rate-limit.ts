/**
 * `--max-bandwidth`, enforced by reading no faster: QEMU 7.2 ignores max-bandwidth for a
 * background snapshot (measured: 20 MiB/s set, 50–70 MiB/s sent).
 */
export class ReadRateLimit {
  constructor(private readonly bytesPerSecond: number | undefined) {}

  /** How long to hold the socket so that `bytes` read since `startedAt` keep to the rate (0: none). */
  delayMs(bytes: number, startedAt: number): number {
    if (!this.bytesPerSecond) return 0;
    const ahead = (bytes / this.bytesPerSecond) * 1000 - (performance.now() - startedAt);
    return ahead > 5 ? ahead : 0;
  }
}
