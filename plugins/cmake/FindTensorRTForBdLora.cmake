# Finds TensorRT where NVIDIA's containers put it and checks its version against trtllm_bdlora/versions.py.
#
# Search order (first hit wins):
#   1. TRT_ROOT (-DTRT_ROOT=... or the TRT_ROOT environment variable, which the Triton TRT-LLM images set)
#   2. /usr/local/tensorrt (the tar install of tensorrtllm_backend's Dockerfile; TENSORRT_LOCAL_PREFIX overrides)
#   3. the distribution layout of NVIDIA's Debian packages: <prefix>/include/<triplet>, <prefix>/lib/<triplet>
#      with <prefix> = /usr (TENSORRT_SYSTEM_PREFIX overrides; tests point both prefixes at fake trees)
# Sets TENSORRT_INCLUDE_DIR, NVINFER_LIB, TENSORRT_VERSION_FOUND. A version other than the pin is fatal unless
# -DBDLORA_ALLOW_TRT_VERSION_MISMATCH=ON.

set(TENSORRT_LOCAL_PREFIX "/usr/local/tensorrt" CACHE PATH "TensorRT tar install location")
set(TENSORRT_SYSTEM_PREFIX "/usr" CACHE PATH "prefix of the distribution (Debian package) layout")
option(BDLORA_ALLOW_TRT_VERSION_MISMATCH "Build against a TensorRT other than the pinned one" OFF)

set(_trt_roots)
if(TRT_ROOT)
  list(APPEND _trt_roots "${TRT_ROOT}")
endif()
if(DEFINED ENV{TRT_ROOT} AND NOT "$ENV{TRT_ROOT}" STREQUAL "")
  list(APPEND _trt_roots "$ENV{TRT_ROOT}")
endif()
list(APPEND _trt_roots "${TENSORRT_LOCAL_PREFIX}")
set(_triplets ${CMAKE_LIBRARY_ARCHITECTURE} x86_64-linux-gnu aarch64-linux-gnu)
set(_inc_paths)
set(_lib_paths)
foreach(root IN LISTS _trt_roots)
  list(APPEND _inc_paths "${root}/include")
  list(APPEND _lib_paths "${root}/lib" "${root}/lib64")
endforeach()
foreach(t IN LISTS _triplets)
  list(APPEND _inc_paths "${TENSORRT_SYSTEM_PREFIX}/include/${t}")
  list(APPEND _lib_paths "${TENSORRT_SYSTEM_PREFIX}/lib/${t}")
endforeach()
list(APPEND _inc_paths "${TENSORRT_SYSTEM_PREFIX}/include")
list(APPEND _lib_paths "${TENSORRT_SYSTEM_PREFIX}/lib64" "${TENSORRT_SYSTEM_PREFIX}/lib")

find_path(TENSORRT_INCLUDE_DIR NvInfer.h PATHS ${_inc_paths} NO_DEFAULT_PATH)
find_library(NVINFER_LIB nvinfer PATHS ${_lib_paths} NO_DEFAULT_PATH)
if(NOT TENSORRT_INCLUDE_DIR OR NOT NVINFER_LIB)
  list(JOIN _inc_paths ", " _searched)
  message(FATAL_ERROR "TensorRT not found (NvInfer.h and libnvinfer) in: ${_searched}; set TRT_ROOT")
endif()

file(STRINGS "${TENSORRT_INCLUDE_DIR}/NvInferVersion.h" _trt_defines
     REGEX "^#define (TRT|NV_TENSORRT)_(MAJOR|MINOR|PATCH|BUILD)(_ENTERPRISE)? +[0-9]+")
set(_parts)
foreach(part MAJOR MINOR PATCH BUILD)
  set(_value "")
  foreach(line IN LISTS _trt_defines)
    if(line MATCHES "^#define (TRT_${part}_ENTERPRISE|NV_TENSORRT_${part}) +([0-9]+)")
      set(_value "${CMAKE_MATCH_2}")
    endif()
  endforeach()
  list(APPEND _parts "${_value}")
endforeach()
list(JOIN _parts "." TENSORRT_VERSION_FOUND)

file(STRINGS "${CMAKE_CURRENT_LIST_DIR}/../../trtllm_bdlora/versions.py" _pin REGEX "^TENSORRT_VERSION = ")
string(REGEX REPLACE "^TENSORRT_VERSION = \"([0-9.]+)\".*" "\\1" TENSORRT_VERSION_PINNED "${_pin}")
message(STATUS "TensorRT ${TENSORRT_VERSION_FOUND} (pinned ${TENSORRT_VERSION_PINNED}): ${TENSORRT_INCLUDE_DIR}, ${NVINFER_LIB}")
if(NOT TENSORRT_VERSION_FOUND STREQUAL TENSORRT_VERSION_PINNED)
  if(BDLORA_ALLOW_TRT_VERSION_MISMATCH)
    message(WARNING "TensorRT ${TENSORRT_VERSION_FOUND} is not the pinned ${TENSORRT_VERSION_PINNED}")
  else()
    message(FATAL_ERROR "TensorRT ${TENSORRT_VERSION_FOUND} at ${TENSORRT_INCLUDE_DIR} is not the pinned "
                        "${TENSORRT_VERSION_PINNED} (trtllm_bdlora/versions.py); -DBDLORA_ALLOW_TRT_VERSION_MISMATCH=ON to try anyway")
  endif()
endif()
