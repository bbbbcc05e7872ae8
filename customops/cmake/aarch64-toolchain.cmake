# Cross-compile the op library for aarch64 (64-bit Arm Linux) with Debian's cross toolchain:
#   apt-get install g++-aarch64-linux-gnu qemu-user
#   cmake -S customops -B build/aarch64/customops \
#         -DCMAKE_TOOLCHAIN_FILE=customops/cmake/aarch64-toolchain.cmake -DORT_INCLUDE_DIR=...
#
# Target libraries (libc, libstdc++) come from the cross toolchain's /usr/aarch64-linux-gnu. The
# third-party dependencies of the build are header-only and architecture-independent, so the host's
# copies serve: xxhash.h and nlohmann/json.hpp in /usr/include (which the Debian cross compiler already
# searches last, after its own headers, so no -I that could shadow the target's libc headers is added),
# nlohmann_json's CMake package in /usr/share/cmake, and the ONNX Runtime headers given by ORT_INCLUDE_DIR.
#
# With qemu-user installed, tests built here run through CMAKE_CROSSCOMPILING_EMULATOR (ctest works).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(EDGEMOE_CROSS_TRIPLE aarch64-linux-gnu CACHE STRING "GNU triple of the aarch64 cross toolchain")
set(EDGEMOE_CROSS_ROOT /usr/${EDGEMOE_CROSS_TRIPLE} CACHE PATH "Target root of the cross toolchain")
set(CMAKE_C_COMPILER ${EDGEMOE_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${EDGEMOE_CROSS_TRIPLE}-g++)

# Look for target libraries and programs' libraries in the target root only; host programs on the host.
set(CMAKE_FIND_ROOT_PATH ${EDGEMOE_CROSS_ROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# The header-only dependencies, from the host (see above). Preset cache entries win over a search, so
# these only apply when the caller has not chosen other copies.
set(EDGEMOE_HOST_HEADERS /usr/include CACHE PATH "Host directory of the header-only deps (xxhash.h)")
if(NOT DEFINED XXHASH_INCLUDE_DIR AND EXISTS ${EDGEMOE_HOST_HEADERS}/xxhash.h)
  set(XXHASH_INCLUDE_DIR ${EDGEMOE_HOST_HEADERS} CACHE PATH "Directory holding xxhash.h (header-only use)")
endif()
if(NOT DEFINED nlohmann_json_DIR)
  foreach(d /usr/share/cmake/nlohmann_json /usr/lib/cmake/nlohmann_json /usr/local/share/cmake/nlohmann_json)
    if(EXISTS ${d}/nlohmann_jsonConfig.cmake)
      set(nlohmann_json_DIR ${d} CACHE PATH "nlohmann_json CMake package (header-only, arch-independent)")
      break()
    endif()
  endforeach()
endif()

# Run target executables (ctest, try_run) under user-mode emulation when it is available.
find_program(EDGEMOE_QEMU_AARCH64 qemu-aarch64)
if(EDGEMOE_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${EDGEMOE_QEMU_AARCH64} -L ${EDGEMOE_CROSS_ROOT})
endif()
