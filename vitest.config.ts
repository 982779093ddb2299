import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Builds the project once and starts the one Postgres cluster every test file shares.
    globalSetup: ['test/harness/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Forks, not threads: tests spawn servers and the CLI, and a crashed fork takes only itself.
    pool: 'forks',
    maxWorkers: 2,
  },
})
