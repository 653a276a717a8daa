#include "common/status.h"

namespace ramkv {

std::string_view status_name(Status s) {
  switch (s) {
    case Status::kOk:
      return "ok";
    case Status::kObjectNotFound:
      return "object not found";
    case Status::kObjectExists:
      return "object exists";
    case Status::kWrongVersion:
      return "wrong version";
    case Status::kUnknownTable:
      return "unknown table";
    case Status::kUnknownTablet:
      return "unknown tablet";
    case Status::kRetry:
      return "retry later";
    case Status::kNoSpace:
      return "no space";
    case Status::kReadOnly:
      return "cluster is read-only";
    case Status::kBadRequest:
      return "bad request";
    case Status::kKeyTooLarge:
      return "key too large";
    case Status::kValueTooLarge:
      return "value too large";
    case Status::kCorrupt:
      return "corrupt data";
    case Status::kFormatError:
      return "format error";
    case Status::kIoError:
      return "I/O error";
    case Status::kTimeout:
      return "timed out";
    case Status::kInvalidObject:
      return "invalid object";
    case Status::kUnavailable:
      return "service unavailable";
    case Status::kInvalidArgument:
      return "invalid argument";
    case Status::kInternal:
      return "internal error";
    case Status::kFenced:
      return "master fenced";
    case Status::kIncomplete:
      return "incomplete log";
    case Status::kStaleRpc:
      return "stale rpc";
  }
  return "unknown status";
}

}  // namespace ramkv
