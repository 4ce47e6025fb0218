"""Caffe's protobuf schema, built at import time from Python tables (no protoc, no caffe_pb2).

Message names, field numbers, types and defaults follow BVLC Caffe's src/caffe/proto/caffe.proto
(proto2, package ``caffe``). Only the messages this importer reads or writes are declared: the net,
layers of both generations (LayerParameter and the legacy V1LayerParameter with its LayerType enum),
blobs, and the parameter messages of the layers that inference and typical training prototxts use.

A second small file (package ``toolchain_caffe_weights``) declares a *reading* view of a .caffemodel
in which a blob's packed ``data``/``double_data`` arrive as raw bytes: the wire format of a packed
repeated float is a length-delimited byte string, so numpy can take it without building one Python
float per weight (AlexNet has 61 million).
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALAR = {
    "double": _FDP.TYPE_DOUBLE, "float": _FDP.TYPE_FLOAT, "int64": _FDP.TYPE_INT64,
    "uint64": _FDP.TYPE_UINT64, "int32": _FDP.TYPE_INT32, "uint32": _FDP.TYPE_UINT32,
    "bool": _FDP.TYPE_BOOL, "string": _FDP.TYPE_STRING, "bytes": _FDP.TYPE_BYTES,
}
_LABEL = {"optional": _FDP.LABEL_OPTIONAL, "repeated": _FDP.LABEL_REPEATED}
_ENGINE = {"DEFAULT": 0, "CAFFE": 1, "CUDNN": 2}


def _f(name, number, type_, label="optional", default=None, packed=False):
    return (name, number, type_, label, default, packed)


def _r(name, number, type_, packed=False):
    return _f(name, number, type_, "repeated", packed=packed)


# Top-level enums.
ENUMS = {"Phase": {"TRAIN": 0, "TEST": 1}}

# message name -> (fields, nested enums). Fields: (name, number, type, label, default, packed).
MESSAGES: dict[str, tuple[list, dict]] = {
    "BlobShape": ([_r("dim", 1, "int64", packed=True)], {}),
    "BlobProto": ([
        _f("shape", 7, "BlobShape"),
        _r("data", 5, "float", packed=True),
        _r("diff", 6, "float", packed=True),
        _r("double_data", 8, "double", packed=True),
        _r("double_diff", 9, "double", packed=True),
        _f("num", 1, "int32", default="0"),
        _f("channels", 2, "int32", default="0"),
        _f("height", 3, "int32", default="0"),
        _f("width", 4, "int32", default="0"),
    ], {}),
    "BlobProtoVector": ([_r("blobs", 1, "BlobProto")], {}),
    "FillerParameter": ([
        _f("type", 1, "string", default="constant"),
        _f("value", 2, "float", default="0"),
        _f("min", 3, "float", default="0"),
        _f("max", 4, "float", default="1"),
        _f("mean", 5, "float", default="0"),
        _f("std", 6, "float", default="1"),
        _f("sparse", 7, "int32", default="-1"),
        _f("variance_norm", 8, "VarianceNorm", default="FAN_IN"),
    ], {"VarianceNorm": {"FAN_IN": 0, "FAN_OUT": 1, "AVERAGE": 2}}),
    "NetParameter": ([
        _f("name", 1, "string"),
        _r("input", 3, "string"),
        _r("input_shape", 8, "BlobShape"),
        _r("input_dim", 4, "int32"),
        _f("force_backward", 5, "bool", default="false"),
        _f("state", 6, "NetState"),
        _f("debug_info", 7, "bool", default="false"),
        _r("layer", 100, "LayerParameter"),
        _r("layers", 2, "V1LayerParameter"),
    ], {}),
    "NetState": ([
        _f("phase", 1, "Phase", default="TEST"),
        _f("level", 2, "int32", default="0"),
        _r("stage", 3, "string"),
    ], {}),
    "NetStateRule": ([
        _f("phase", 1, "Phase"),
        _f("min_level", 2, "int32"),
        _f("max_level", 3, "int32"),
        _r("stage", 4, "string"),
        _r("not_stage", 5, "string"),
    ], {}),
    "ParamSpec": ([
        _f("name", 1, "string"),
        _f("share_mode", 2, "DimCheckMode"),
        _f("lr_mult", 3, "float", default="1"),
        _f("decay_mult", 4, "float", default="1"),
    ], {"DimCheckMode": {"STRICT": 0, "PERMISSIVE": 1}}),
    "LayerParameter": ([
        _f("name", 1, "string"),
        _f("type", 2, "string"),
        _r("bottom", 3, "string"),
        _r("top", 4, "string"),
        _f("phase", 10, "Phase"),
        _r("loss_weight", 5, "float"),
        _r("param", 6, "ParamSpec"),
        _r("blobs", 7, "BlobProto"),
        _r("propagate_down", 11, "bool"),
        _r("include", 8, "NetStateRule"),
        _r("exclude", 9, "NetStateRule"),
        _f("transform_param", 100, "TransformationParameter"),
        _f("loss_param", 101, "LossParameter"),
        _f("accuracy_param", 102, "AccuracyParameter"),
        _f("argmax_param", 103, "ArgMaxParameter"),
        _f("batch_norm_param", 139, "BatchNormParameter"),
        _f("bias_param", 141, "BiasParameter"),
        _f("concat_param", 104, "ConcatParameter"),
        _f("convolution_param", 106, "ConvolutionParameter"),
        _f("crop_param", 144, "CropParameter"),
        _f("data_param", 107, "DataParameter"),
        _f("dropout_param", 108, "DropoutParameter"),
        _f("dummy_data_param", 109, "DummyDataParameter"),
        _f("eltwise_param", 110, "EltwiseParameter"),
        _f("elu_param", 140, "ELUParameter"),
        _f("exp_param", 111, "ExpParameter"),
        _f("flatten_param", 135, "FlattenParameter"),
        _f("hdf5_data_param", 112, "HDF5DataParameter"),
        _f("hdf5_output_param", 113, "HDF5OutputParameter"),
        _f("image_data_param", 115, "ImageDataParameter"),
        _f("inner_product_param", 117, "InnerProductParameter"),
        _f("input_param", 143, "InputParameter"),
        _f("log_param", 134, "LogParameter"),
        _f("lrn_param", 118, "LRNParameter"),
        _f("memory_data_param", 119, "MemoryDataParameter"),
        _f("mvn_param", 120, "MVNParameter"),
        _f("pooling_param", 121, "PoolingParameter"),
        _f("power_param", 122, "PowerParameter"),
        _f("prelu_param", 131, "PReLUParameter"),
        _f("python_param", 130, "PythonParameter"),
        _f("relu_param", 123, "ReLUParameter"),
        _f("reshape_param", 133, "ReshapeParameter"),
        _f("scale_param", 142, "ScaleParameter"),
        _f("sigmoid_param", 124, "SigmoidParameter"),
        _f("softmax_param", 125, "SoftmaxParameter"),
        _f("slice_param", 126, "SliceParameter"),
        _f("tanh_param", 127, "TanHParameter"),
        _f("threshold_param", 128, "ThresholdParameter"),
    ], {}),
    "TransformationParameter": ([
        _f("scale", 1, "float", default="1"),
        _f("mirror", 2, "bool", default="false"),
        _f("crop_size", 3, "uint32", default="0"),
        _f("mean_file", 4, "string"),
        _r("mean_value", 5, "float"),
        _f("force_color", 6, "bool", default="false"),
        _f("force_gray", 7, "bool", default="false"),
    ], {}),
    "LossParameter": ([
        _f("ignore_label", 1, "int32"),
        _f("normalization", 3, "NormalizationMode", default="VALID"),
        _f("normalize", 2, "bool"),
    ], {"NormalizationMode": {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2, "NONE": 3}}),
    "AccuracyParameter": ([
        _f("top_k", 1, "uint32", default="1"),
        _f("axis", 2, "int32", default="1"),
        _f("ignore_label", 3, "int32"),
    ], {}),
    "ArgMaxParameter": ([
        _f("out_max_val", 1, "bool", default="false"),
        _f("top_k", 2, "uint32", default="1"),
        _f("axis", 3, "int32"),
    ], {}),
    "ConcatParameter": ([
        _f("axis", 2, "int32", default="1"),
        _f("concat_dim", 1, "uint32", default="1"),
    ], {}),
    "BatchNormParameter": ([
        _f("use_global_stats", 1, "bool"),
        _f("moving_average_fraction", 2, "float", default="0.999"),
        _f("eps", 3, "float", default="1e-05"),
    ], {}),
    "BiasParameter": ([
        _f("axis", 1, "int32", default="1"),
        _f("num_axes", 2, "int32", default="1"),
        _f("filler", 3, "FillerParameter"),
    ], {}),
    "ConvolutionParameter": ([
        _f("num_output", 1, "uint32"),
        _f("bias_term", 2, "bool", default="true"),
        _r("pad", 3, "uint32"),
        _r("kernel_size", 4, "uint32"),
        _r("stride", 6, "uint32"),
        _r("dilation", 18, "uint32"),
        _f("pad_h", 9, "uint32", default="0"),
        _f("pad_w", 10, "uint32", default="0"),
        _f("kernel_h", 11, "uint32"),
        _f("kernel_w", 12, "uint32"),
        _f("stride_h", 13, "uint32"),
        _f("stride_w", 14, "uint32"),
        _f("group", 5, "uint32", default="1"),
        _f("weight_filler", 7, "FillerParameter"),
        _f("bias_filler", 8, "FillerParameter"),
        _f("engine", 15, "Engine", default="DEFAULT"),
        _f("axis", 16, "int32", default="1"),
        _f("force_nd_im2col", 17, "bool", default="false"),
    ], {"Engine": _ENGINE}),
    "CropParameter": ([
        _f("axis", 1, "int32", default="2"),
        _r("offset", 2, "uint32"),
    ], {}),
    "DataParameter": ([
        _f("source", 1, "string"),
        _f("batch_size", 4, "uint32"),
        _f("rand_skip", 7, "uint32", default="0"),
        _f("backend", 8, "DB", default="LEVELDB"),
        _f("scale", 2, "float", default="1"),
        _f("mean_file", 3, "string"),
        _f("crop_size", 5, "uint32", default="0"),
        _f("mirror", 6, "bool", default="false"),
        _f("force_encoded_color", 9, "bool", default="false"),
        _f("prefetch", 10, "uint32", default="4"),
    ], {"DB": {"LEVELDB": 0, "LMDB": 1}}),
    "DropoutParameter": ([_f("dropout_ratio", 1, "float", default="0.5")], {}),
    "DummyDataParameter": ([
        _r("data_filler", 1, "FillerParameter"),
        _r("shape", 6, "BlobShape"),
        _r("num", 2, "uint32"),
        _r("channels", 3, "uint32"),
        _r("height", 4, "uint32"),
        _r("width", 5, "uint32"),
    ], {}),
    "EltwiseParameter": ([
        _f("operation", 1, "EltwiseOp", default="SUM"),
        _r("coeff", 2, "float"),
        _f("stable_prod_grad", 3, "bool", default="true"),
    ], {"EltwiseOp": {"PROD": 0, "SUM": 1, "MAX": 2}}),
    "ELUParameter": ([_f("alpha", 1, "float", default="1")], {}),
    "ExpParameter": ([
        _f("base", 1, "float", default="-1"),
        _f("scale", 2, "float", default="1"),
        _f("shift", 3, "float", default="0"),
    ], {}),
    "FlattenParameter": ([
        _f("axis", 1, "int32", default="1"),
        _f("end_axis", 2, "int32", default="-1"),
    ], {}),
    "HDF5DataParameter": ([
        _f("source", 1, "string"),
        _f("batch_size", 2, "uint32"),
        _f("shuffle", 3, "bool", default="false"),
    ], {}),
    "HDF5OutputParameter": ([_f("file_name", 1, "string")], {}),
    "ImageDataParameter": ([
        _f("source", 1, "string"),
        _f("batch_size", 4, "uint32", default="1"),
        _f("rand_skip", 7, "uint32", default="0"),
        _f("shuffle", 8, "bool", default="false"),
        _f("new_height", 9, "uint32", default="0"),
        _f("new_width", 10, "uint32", default="0"),
        _f("is_color", 11, "bool", default="true"),
        _f("scale", 2, "float", default="1"),
        _f("mean_file", 3, "string"),
        _f("crop_size", 5, "uint32", default="0"),
        _f("mirror", 6, "bool", default="false"),
        _f("root_folder", 12, "string", default=""),
    ], {}),
    "InnerProductParameter": ([
        _f("num_output", 1, "uint32"),
        _f("bias_term", 2, "bool", default="true"),
        _f("weight_filler", 3, "FillerParameter"),
        _f("bias_filler", 4, "FillerParameter"),
        _f("axis", 5, "int32", default="1"),
        _f("transpose", 6, "bool", default="false"),
    ], {}),
    "InputParameter": ([_r("shape", 1, "BlobShape")], {}),
    "LogParameter": ([
        _f("base", 1, "float", default="-1"),
        _f("scale", 2, "float", default="1"),
        _f("shift", 3, "float", default="0"),
    ], {}),
    "LRNParameter": ([
        _f("local_size", 1, "uint32", default="5"),
        _f("alpha", 2, "float", default="1"),
        _f("beta", 3, "float", default="0.75"),
        _f("norm_region", 4, "NormRegion", default="ACROSS_CHANNELS"),
        _f("k", 5, "float", default="1"),
        _f("engine", 6, "Engine", default="DEFAULT"),
    ], {"NormRegion": {"ACROSS_CHANNELS": 0, "WITHIN_CHANNEL": 1}, "Engine": _ENGINE}),
    "MemoryDataParameter": ([
        _f("batch_size", 1, "uint32"),
        _f("channels", 2, "uint32"),
        _f("height", 3, "uint32"),
        _f("width", 4, "uint32"),
    ], {}),
    "MVNParameter": ([
        _f("normalize_variance", 1, "bool", default="true"),
        _f("across_channels", 2, "bool", default="false"),
        _f("eps", 3, "float", default="1e-09"),
    ], {}),
    "PoolingParameter": ([
        _f("pool", 1, "PoolMethod", default="MAX"),
        _f("pad", 4, "uint32", default="0"),
        _f("pad_h", 9, "uint32", default="0"),
        _f("pad_w", 10, "uint32", default="0"),
        _f("kernel_size", 2, "uint32"),
        _f("kernel_h", 5, "uint32"),
        _f("kernel_w", 6, "uint32"),
        _f("stride", 3, "uint32", default="1"),
        _f("stride_h", 7, "uint32"),
        _f("stride_w", 8, "uint32"),
        _f("engine", 11, "Engine", default="DEFAULT"),
        _f("global_pooling", 12, "bool", default="false"),
        _f("round_mode", 13, "RoundMode", default="CEIL"),
    ], {"PoolMethod": {"MAX": 0, "AVE": 1, "STOCHASTIC": 2}, "Engine": _ENGINE,
        "RoundMode": {"CEIL": 0, "FLOOR": 1}}),
    "PowerParameter": ([
        _f("power", 1, "float", default="1"),
        _f("scale", 2, "float", default="1"),
        _f("shift", 3, "float", default="0"),
    ], {}),
    "PReLUParameter": ([
        _f("filler", 1, "FillerParameter"),
        _f("channel_shared", 2, "bool", default="false"),
    ], {}),
    "PythonParameter": ([
        _f("module", 1, "string"),
        _f("layer", 2, "string"),
        _f("param_str", 3, "string", default=""),
        _f("share_in_parallel", 4, "bool", default="false"),
    ], {}),
    "ReLUParameter": ([
        _f("negative_slope", 1, "float", default="0"),
        _f("engine", 2, "Engine", default="DEFAULT"),
    ], {"Engine": _ENGINE}),
    "ReshapeParameter": ([
        _f("shape", 1, "BlobShape"),
        _f("axis", 2, "int32", default="0"),
        _f("num_axes", 3, "int32", default="-1"),
    ], {}),
    "ScaleParameter": ([
        _f("axis", 1, "int32", default="1"),
        _f("num_axes", 2, "int32", default="1"),
        _f("filler", 3, "FillerParameter"),
        _f("bias_term", 4, "bool", default="false"),
        _f("bias_filler", 5, "FillerParameter"),
    ], {}),
    "SigmoidParameter": ([_f("engine", 1, "Engine", default="DEFAULT")], {"Engine": _ENGINE}),
    "SoftmaxParameter": ([
        _f("engine", 1, "Engine", default="DEFAULT"),
        _f("axis", 2, "int32", default="1"),
    ], {"Engine": _ENGINE}),
    "SliceParameter": ([
        _f("axis", 3, "int32", default="1"),
        _r("slice_point", 2, "uint32"),
        _f("slice_dim", 1, "uint32", default="1"),
    ], {}),
    "TanHParameter": ([_f("engine", 1, "Engine", default="DEFAULT")], {"Engine": _ENGINE}),
    "ThresholdParameter": ([_f("threshold", 1, "float", default="0")], {}),
    "V1LayerParameter": ([
        _r("bottom", 2, "string"),
        _r("top", 3, "string"),
        _f("name", 4, "string"),
        _r("include", 32, "NetStateRule"),
        _r("exclude", 33, "NetStateRule"),
        _f("type", 5, "LayerType"),
        _r("blobs", 6, "BlobProto"),
        _r("param", 1001, "string"),
        _r("blob_share_mode", 1002, "DimCheckMode"),
        _r("blobs_lr", 7, "float"),
        _r("weight_decay", 8, "float"),
        _r("loss_weight", 35, "float"),
        _f("accuracy_param", 27, "AccuracyParameter"),
        _f("argmax_param", 23, "ArgMaxParameter"),
        _f("concat_param", 9, "ConcatParameter"),
        _f("convolution_param", 10, "ConvolutionParameter"),
        _f("data_param", 11, "DataParameter"),
        _f("dropout_param", 12, "DropoutParameter"),
        _f("dummy_data_param", 26, "DummyDataParameter"),
        _f("eltwise_param", 24, "EltwiseParameter"),
        _f("exp_param", 41, "ExpParameter"),
        _f("hdf5_data_param", 13, "HDF5DataParameter"),
        _f("hdf5_output_param", 14, "HDF5OutputParameter"),
        _f("image_data_param", 15, "ImageDataParameter"),
        _f("inner_product_param", 17, "InnerProductParameter"),
        _f("lrn_param", 18, "LRNParameter"),
        _f("memory_data_param", 22, "MemoryDataParameter"),
        _f("mvn_param", 34, "MVNParameter"),
        _f("pooling_param", 19, "PoolingParameter"),
        _f("power_param", 21, "PowerParameter"),
        _f("relu_param", 30, "ReLUParameter"),
        _f("sigmoid_param", 38, "SigmoidParameter"),
        _f("softmax_param", 39, "SoftmaxParameter"),
        _f("slice_param", 31, "SliceParameter"),
        _f("tanh_param", 37, "TanHParameter"),
        _f("threshold_param", 25, "ThresholdParameter"),
        _f("transform_param", 36, "TransformationParameter"),
        _f("loss_param", 42, "LossParameter"),
    ], {
        "LayerType": {
            "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "ARGMAX": 30, "BNLL": 2, "CONCAT": 3,
            "CONTRASTIVE_LOSS": 37, "CONVOLUTION": 4, "DATA": 5, "DECONVOLUTION": 39, "DROPOUT": 6,
            "DUMMY_DATA": 32, "EUCLIDEAN_LOSS": 7, "ELTWISE": 25, "EXP": 38, "FLATTEN": 8,
            "HDF5_DATA": 9, "HDF5_OUTPUT": 10, "HINGE_LOSS": 28, "IM2COL": 11, "IMAGE_DATA": 12,
            "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15, "MEMORY_DATA": 29,
            "MULTINOMIAL_LOGISTIC_LOSS": 16, "MVN": 34, "POOLING": 17, "POWER": 26, "RELU": 18,
            "SIGMOID": 19, "SIGMOID_CROSS_ENTROPY_LOSS": 27, "SILENCE": 36, "SOFTMAX": 20,
            "SOFTMAX_LOSS": 21, "SPLIT": 22, "SLICE": 33, "TANH": 23, "WINDOW_DATA": 24,
            "THRESHOLD": 31,
        },
        "DimCheckMode": {"STRICT": 0, "PERMISSIVE": 1},
    }),
}

# V1 LayerType enum name -> the LayerParameter type string (Caffe's UpgradeV1LayerType).
V1_TYPE_NAMES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution", "DECONVOLUTION": "Deconvolution",
    "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}
V1_TYPE_BY_NAME = {v: k for k, v in V1_TYPE_NAMES.items()}

# Reading view of a .caffemodel: names, types and blobs only; packed arrays as raw bytes
# (repeated, in case a writer split a packed field into several chunks).
_WEIGHT_MESSAGES: dict[str, tuple[list, dict]] = {
    "RawBlob": ([
        _f("shape", 7, ".caffe.BlobShape"),
        _r("data", 5, "bytes"),
        _r("double_data", 8, "bytes"),
        _f("num", 1, "int32", default="0"),
        _f("channels", 2, "int32", default="0"),
        _f("height", 3, "int32", default="0"),
        _f("width", 4, "int32", default="0"),
    ], {}),
    "RawLayer": ([_f("name", 1, "string"), _f("type", 2, "string"), _r("blobs", 7, "RawBlob")], {}),
    "RawV1Layer": ([_f("name", 4, "string"), _f("type", 5, "int32"), _r("blobs", 6, "RawBlob")], {}),
    "RawNet": ([_f("name", 1, "string"), _r("layer", 100, "RawLayer"), _r("layers", 2, "RawV1Layer")], {}),
}


def _file_proto(name: str, package: str, messages, enums, deps=()) -> descriptor_pb2.FileDescriptorProto:
    fp = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto2", dependency=list(deps))
    for ename, values in enums.items():
        e = fp.enum_type.add(name=ename)
        for vname, number in values.items():
            e.value.add(name=vname, number=number)
    for mname, (fields, nested) in messages.items():
        m = fp.message_type.add(name=mname)
        for ename, values in nested.items():
            e = m.enum_type.add(name=ename)
            for vname, number in values.items():
                e.value.add(name=vname, number=number)
        for fname, number, type_, label, default, packed in fields:
            fd = m.field.add(name=fname, number=number, label=_LABEL[label])
            if type_ in _SCALAR:
                fd.type = _SCALAR[type_]
            elif type_.startswith("."):
                fd.type, fd.type_name = _FDP.TYPE_MESSAGE, type_
            elif type_ in nested:
                fd.type, fd.type_name = _FDP.TYPE_ENUM, f".{package}.{mname}.{type_}"
            elif type_ in enums:
                fd.type, fd.type_name = _FDP.TYPE_ENUM, f".{package}.{type_}"
            elif type_ in messages:
                fd.type, fd.type_name = _FDP.TYPE_MESSAGE, f".{package}.{type_}"
            else:  # pragma: no cover - a typo in the tables above
                raise AssertionError(f"unknown type {type_!r} in {mname}.{fname}")
            if default is not None:
                fd.default_value = default
            if packed:
                fd.options.packed = True
    return fp


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file_proto("toolchain/caffe.proto", "caffe", MESSAGES, ENUMS))
_pool.Add(_file_proto("toolchain/caffe_weights.proto", "toolchain_caffe_weights", _WEIGHT_MESSAGES, {},
                      deps=["toolchain/caffe.proto"]))


def message_class(name: str):
    """The generated class of a message, e.g. ``message_class("caffe.NetParameter")``."""
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(name))


NetParameter = message_class("caffe.NetParameter")
LayerParameter = message_class("caffe.LayerParameter")
V1LayerParameter = message_class("caffe.V1LayerParameter")
BlobProto = message_class("caffe.BlobProto")
BlobShape = message_class("caffe.BlobShape")
RawNet = message_class("toolchain_caffe_weights.RawNet")
RawBlob = message_class("toolchain_caffe_weights.RawBlob")


def v1_type_name(number: int) -> str | None:
    """V1 LayerType enum number -> LayerParameter type string (None if unknown)."""
    enum = _pool.FindEnumTypeByName("caffe.V1LayerParameter.LayerType")
    value = enum.values_by_number.get(number)
    return V1_TYPE_NAMES.get(value.name) if value is not None else None


def v1_type_number(type_name: str) -> int:
    """LayerParameter type string -> V1 LayerType enum number (KeyError if V1 has no such type)."""
    enum = _pool.FindEnumTypeByName("caffe.V1LayerParameter.LayerType")
    return enum.values_by_name[V1_TYPE_BY_NAME[type_name]].number
