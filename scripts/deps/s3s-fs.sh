#!/usr/bin/env bash
# Installs s3s-fs (crates.io), the S3-compatible server that the archiver's tests start on a
# free loopback port to prove the archive against a real S3 API (conditional puts, multipart
# uploads, ranged reads). Idempotent: skips the build when that version is installed.
set -euo pipefail
VERSION=0.14.1
if command -v s3s-fs >/dev/null 2>&1 && cargo install --list | grep -q "^s3s-fs v$VERSION:"; then
    exit 0
fi
cargo install s3s-fs --version "$VERSION" --features binary --locked
