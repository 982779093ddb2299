// @ts-check
import js from '@eslint/js'
import tseslint from 'typescript-eslint'

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/', '.data/', 'eslint.config.js'] },
  js.configs.recommended,
  ...tseslint.configs.strictTypeChecked,
  {
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      // Template literals with numbers are how log and error messages are written here.
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true }],
      // Unused parameters named _x document a signature we must satisfy.
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_' },
      ],
      'no-console': 'error',
    },
  },
  {
    files: ['projections/migrations/*.ts'],
    rules: {
      // Migrations are frozen in time and take Kysely<any>, not today's table types (Kysely's own advice).
      '@typescript-eslint/no-explicit-any': 'off',
    },
  },
  {
    files: ['test/**/*.ts'],
    rules: {
      // In a test, a missing value fails the test at the assertion, which is what we want.
      '@typescript-eslint/no-non-null-assertion': 'off',
    },
  },
  {
    files: ['test/**/*.ts', 'cli/**/*.ts'],
    rules: {
      // The CLI and the test harness talk to people on the terminal.
      'no-console': 'off',
    },
  },
)
