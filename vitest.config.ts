import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 180_000,
    // Real-QEMU tests share two cores; running their files one at a time keeps timings honest.
    fileParallelism: false,
    reporters: ['default'],
  },
});
