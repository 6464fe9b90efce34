// A string in each compiled library naming the torch it was built for, so tvlars_fused/_extension.py can
// skip (and rebuild) a prebuilt library from another torch without loading it. Include in one file per library.
#pragma once

#ifndef TVLARS_TORCH_VERSION
#error "build with -DTVLARS_TORCH_VERSION=\"<torch.__version__>\""
#endif

extern "C" __attribute__((used)) const char tvlars_fused_built_with[] =
    "tvlars_fused built with torch " TVLARS_TORCH_VERSION ";";
