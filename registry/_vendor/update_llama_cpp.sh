#!/usr/bin/env bash
# Replace the vendored llama.cpp converter with the one in llama-cpp-python VERSION's source distribution.
#   bash registry/_vendor/update_llama_cpp.sh 0.3.36 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
set -euo pipefail
version=${1:?usage: update_llama_cpp.sh VERSION SHA256}
sha=${2:?usage: update_llama_cpp.sh VERSION SHA256}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
url=$(curl -fsS "https://pypi.org/simple/llama-cpp-python/" | grep -o "https://[^\"#]*llama_cpp_python-$version.tar.gz" | head -1)
curl -fsS -o "$work/sdist.tar.gz" "$url"
echo "$sha  $work/sdist.tar.gz" | sha256sum -c -
src="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$work/sdist.tar.gz" -C "$work" "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE"
dest="$here/llama_cpp"
rm -rf "$dest/conversion" "$dest/gguf-py" "$dest/convert_hf_to_gguf.py" "$dest/LICENSE"
mkdir -p "$dest/gguf-py"
cp "$work/$src/convert_hf_to_gguf.py" "$work/$src/LICENSE" "$dest/"
cp -r "$work/$src/conversion" "$dest/"
cp -r "$work/$src/gguf-py/gguf" "$work/$src/gguf-py/LICENSE" "$work/$src/gguf-py/pyproject.toml" "$dest/gguf-py/"
echo "vendored llama.cpp converter from llama-cpp-python $version; update VENDORED.md and the gguf extra's pin"
